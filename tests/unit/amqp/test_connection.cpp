// How broker replies become errors: which refusals are permanent (the
// daemon stops), which close only a channel (that queue recovers), and the
// text an operator reads.
#include <catch2/catch.hpp>

#include <amqp.h>
#include <amqp_framing.h>

#include "amqp/connection.hpp"

using namespace er;

namespace {
amqp_rpc_reply_t channel_close(uint16_t code, const char* text, amqp_channel_close_t& m) {
  m = {};
  m.reply_code = code;
  m.reply_text = amqp_cstring_bytes(text);
  amqp_rpc_reply_t r{};
  r.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION;
  r.reply.id = AMQP_CHANNEL_CLOSE_METHOD;
  r.reply.decoded = &m;
  return r;
}
amqp::AmqpError error_of(const amqp_rpc_reply_t& r) {
  try {
    amqp::check_reply(r, "declaring queue 'q'");
  } catch (const amqp::AmqpError& e) {
    return e;
  }
  FAIL("no error");
  return amqp::AmqpError("unreachable");
}
}  // namespace

TEST_CASE("check_reply: refusals a retry cannot fix are permanent", "[amqp]") {
  amqp_channel_close_t m;
  auto e = error_of(channel_close(AMQP_PRECONDITION_FAILED,
                                  "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': "
                                  "received none but current is the value '5' of type 'signedint'",
                                  m));
  CHECK(e.permanent());
  CHECK(e.channel_closed());
  CHECK(e.reply_code() == AMQP_PRECONDITION_FAILED);
  CHECK(std::string(e.what()) ==
        "declaring queue 'q': queue 'q' already exists on the broker (vhost '/') with a different 'x-max-length' "
        "argument: the config declares none but the broker has the value '5' of type 'signedint'. Delete the "
        "queue or make the config match it");
  CHECK(error_of(channel_close(AMQP_ACCESS_REFUSED, "ACCESS_REFUSED", m)).permanent());
}

TEST_CASE("check_reply: NOT_FOUND (a queue whose home node is down) is transient and local", "[amqp]") {
  amqp_channel_close_t m;
  auto e = error_of(channel_close(AMQP_NOT_FOUND, "NOT_FOUND - home node 'rabbit@b' of queue 'q' is down", m));
  CHECK_FALSE(e.permanent());
  CHECK(e.channel_closed());
  CHECK(std::string(e.what()).find("not found: NOT_FOUND - home node") != std::string::npos);
}

TEST_CASE("check_reply: a closed connection or a library error is neither", "[amqp]") {
  amqp_connection_close_t m{};
  m.reply_code = AMQP_CONNECTION_FORCED;
  m.reply_text = amqp_cstring_bytes("CONNECTION_FORCED - broker forced connection closure");
  amqp_rpc_reply_t r{};
  r.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION;
  r.reply.id = AMQP_CONNECTION_CLOSE_METHOD;
  r.reply.decoded = &m;
  auto e = error_of(r);
  CHECK_FALSE(e.permanent());
  CHECK_FALSE(e.channel_closed());

  amqp_rpc_reply_t t{};
  t.reply_type = AMQP_RESPONSE_LIBRARY_EXCEPTION;
  t.library_error = AMQP_STATUS_TIMEOUT;
  auto te = error_of(t);
  CHECK_FALSE(te.permanent());
  CHECK_FALSE(te.channel_closed());
  CHECK(std::string(te.what()) == "declaring queue 'q': request timed out");

  amqp_rpc_reply_t ok{};
  ok.reply_type = AMQP_RESPONSE_NORMAL;
  CHECK_NOTHROW(amqp::check_reply(ok, "x"));
}
