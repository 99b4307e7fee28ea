// The frame reader assembles deliveries without waiting and keeps at most
// `keep` bytes of a body; protocol violations are reported, not trusted.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "consume/frame_reader.hpp"

using er::consume::FrameReader;

namespace {
amqp_basic_deliver_t deliver(uint64_t tag) {
  amqp_basic_deliver_t m{};
  m.delivery_tag = tag;
  m.exchange = amqp_cstring_bytes("ex");
  m.routing_key = amqp_cstring_bytes("a.b");
  m.consumer_tag = amqp_cstring_bytes("ctag");
  return m;
}
amqp_frame_t header(amqp_channel_t ch, uint64_t size, amqp_basic_properties_t* props) {
  amqp_frame_t f{};
  f.frame_type = AMQP_FRAME_HEADER;
  f.channel = ch;
  f.payload.properties.body_size = size;
  f.payload.properties.decoded = props;
  return f;
}
amqp_frame_t body(amqp_channel_t ch, std::string& s) {
  amqp_frame_t f{};
  f.frame_type = AMQP_FRAME_BODY;
  f.channel = ch;
  f.payload.body_fragment = amqp_bytes_t{s.size(), s.data()};
  return f;
}
std::string str(amqp_bytes_t b) { return std::string(static_cast<const char*>(b.bytes), b.len); }
}  // namespace

TEST_CASE("frame reader: a delivery in pieces, its body cut at `keep`", "[frame_reader]") {
  FrameReader r;
  FrameReader::Done done;
  amqp_basic_properties_t props{};
  props._flags = AMQP_BASIC_MESSAGE_ID_FLAG;
  std::string mid = "m-1";
  props.message_id = amqp_bytes_t{mid.size(), mid.data()};
  r.start_delivery(3, deliver(7), /*keep*/ 8);
  REQUIRE(r.content(header(3, 10, &props), done));
  CHECK(done.kind == FrameReader::Kind::None);
  mid = "zzz";  // the frame's memory is reused: the delivery must have its own copy
  std::string a = "0123", b = "456789";
  REQUIRE(r.content(body(3, a), done));
  CHECK(done.kind == FrameReader::Kind::None);
  REQUIRE(r.content(body(3, b), done));
  REQUIRE(done.kind == FrameReader::Kind::Delivery);
  CHECK(done.body_size == 10);
  CHECK(str(done.env.message.body) == "01234567");
  CHECK(done.env.delivery_tag == 7);
  CHECK(str(done.env.routing_key) == "a.b");
  CHECK(str(done.env.message.properties.message_id) == "m-1");
  CHECK(r.assembling() == 0);
  amqp_destroy_envelope(&done.env);
}

TEST_CASE("frame reader: an empty body completes at its header", "[frame_reader]") {
  FrameReader r;
  FrameReader::Done done;
  amqp_basic_properties_t props{};
  r.start_delivery(2, deliver(1), 100);
  REQUIRE(r.content(header(2, 0, &props), done));
  REQUIRE(done.kind == FrameReader::Kind::Delivery);
  CHECK(done.env.message.body.len == 0);
  amqp_destroy_envelope(&done.env);
}

TEST_CASE("frame reader: content that follows no message, or overruns it, is refused", "[frame_reader]") {
  FrameReader r;
  FrameReader::Done done;
  amqp_basic_properties_t props{};
  std::string x = "xx";
  CHECK_FALSE(r.content(body(5, x), done));
  r.start_delivery(5, deliver(1), 100);
  CHECK_FALSE(r.content(body(5, x), done));  // body before header
  r.start_delivery(6, deliver(2), 100);
  REQUIRE(r.content(header(6, 1, &props), done));
  CHECK_FALSE(r.content(body(6, x), done));  // more than announced
  r.forget(5);
  r.forget(6);
  CHECK(r.assembling() == 0);
}

TEST_CASE("frame reader: a message that stops arriving is noticed", "[frame_reader]") {
  FrameReader r;
  r.start_delivery(2, deliver(1), 100);
  CHECK_FALSE(r.stalled(std::chrono::milliseconds(500)));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(r.stalled(std::chrono::milliseconds(10)));
}

TEST_CASE("frame reader: a return is read to its end and names its target", "[frame_reader]") {
  FrameReader r;
  FrameReader::Done done;
  amqp_basic_properties_t props{};
  amqp_basic_return_t m{};
  m.routing_key = amqp_cstring_bytes("work.dlq");
  r.start_return(1, m);
  std::string b = "abc";
  REQUIRE(r.content(header(1, 3, &props), done));
  REQUIRE(r.content(body(1, b), done));
  CHECK(done.kind == FrameReader::Kind::Return);
  CHECK(done.routing_key == "work.dlq");
  CHECK(done.exchange.empty());  // a copy, through the default exchange

  // An emitted event, through the config's exchange: the exchange tells them apart.
  m.exchange = amqp_cstring_bytes("events");
  m.routing_key = amqp_cstring_bytes("rag.dfn_generated");
  r.start_return(1, m);
  REQUIRE(r.content(header(1, 3, &props), done));
  REQUIRE(r.content(body(1, b), done));
  CHECK(done.kind == FrameReader::Kind::Return);
  CHECK(done.exchange == "events");
  CHECK(done.routing_key == "rag.dfn_generated");
}
