#pragma once
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

#include "config/config.hpp"
#include "dispatch/handler.hpp"

namespace er::dispatch {

// Loads the plugin (dlopen RTLD_NOW), negotiates the version and calls
// er_plugin_init with the handler's config. Throws std::runtime_error with a
// clear message (path, dlerror, missing symbol, version, plugin's error).
// NONBLOCKING plugins run inline on the loop; others on `pool`.
std::unique_ptr<Handler> make_plugin_handler(const config::HandlerConfig& cfg,
                                             boost::asio::io_context& io,
                                             boost::asio::thread_pool& pool);

}  // namespace er::dispatch
