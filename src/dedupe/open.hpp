#pragma once
#include <boost/asio/io_context.hpp>

#include <memory>

#include "config/config.hpp"
#include "dedupe/backend.hpp"

namespace er::dedupe {

// The store `cfg` asks for: null when no queue dedupes; `prev` (the store of
// `prev_cfg`, running) when it names the same one; else a new SQLite store in
// state_dir (throws std::runtime_error) or a PostgreSQL store (connects later,
// on the loop). Callable off the loop.
std::shared_ptr<Backend> open_store(boost::asio::io_context& io, const config::Config& cfg,
                                    const config::Config* prev_cfg = nullptr, std::shared_ptr<Backend> prev = nullptr);

}  // namespace er::dedupe
