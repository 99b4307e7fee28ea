#include "dedupe/open.hpp"

#include <algorithm>

#include "dedupe/pg_store.hpp"
#include "dedupe/store.hpp"

namespace er::dedupe {

std::shared_ptr<Backend> open_store(boost::asio::io_context& io, const config::Config& cfg,
                                    const config::Config* prev_cfg, std::shared_ptr<Backend> prev) {
  if (std::none_of(cfg.queues.begin(), cfg.queues.end(), [](const auto& q) { return q.dedupe_ttl.count() > 0; }))
    return nullptr;
  const bool pg = !cfg.dedupe_store.postgres.empty();
  if (prev && prev_cfg) {
    const bool same = pg ? prev_cfg->dedupe_store == cfg.dedupe_store
                         : prev_cfg->dedupe_store.postgres.empty() && prev_cfg->state_dir == cfg.state_dir;
    if (same) return prev;
  }
  if (pg) return std::make_shared<PgStore>(io, cfg.dedupe_store);
  return std::make_shared<Store>(cfg.state_dir);
}

}  // namespace er::dedupe
