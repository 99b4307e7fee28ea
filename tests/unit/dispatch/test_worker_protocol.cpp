// The worker protocol's two texts: answers a worker writes (parse_worker_answer,
// every kind of garbage) and the event lines the daemon writes.
#include "dispatch/worker_handler.hpp"

#include <string>

#include <catch2/catch.hpp>
#include <rapidjson/document.h>

using namespace er::dispatch;

namespace {

WorkerAnswer ok(const std::string& line) {
  WorkerAnswer a;
  std::string err;
  INFO(line);
  REQUIRE(parse_worker_answer(line, a, err));
  CHECK(err.empty());
  return a;
}

std::string bad(const std::string& line) {
  WorkerAnswer a;
  std::string err;
  INFO(line);
  CHECK_FALSE(parse_worker_answer(line, a, err));
  CHECK_FALSE(err.empty());
  return err;
}

}  // namespace

TEST_CASE("worker answers: ready and the three verdicts", "[worker]") {
  auto r = ok(R"({"type":"ready","protocol":1})");
  CHECK(r.type == WorkerAnswer::Type::Ready);
  CHECK(r.protocol == 1);
  CHECK(ok(R"({"type":"ready","protocol":2,"extra":[1]})").protocol == 2);

  auto a = ok(R"({"type":"result","id":17,"verdict":"ack"})");
  CHECK(a.type == WorkerAnswer::Type::Result);
  CHECK(a.id == 17);
  CHECK(a.outcome.verdict == Verdict::Ack);
  CHECK(a.outcome.emits.empty());

  auto rt = ok(R"({"type":"result","id":18,"verdict":"retry","delay_ms":30000,"reason":"db_down","detail":"refused"})");
  CHECK(rt.outcome.verdict == Verdict::Retry);
  CHECK(rt.outcome.retry_delay == std::chrono::milliseconds(30000));
  CHECK(rt.outcome.reason == "db_down");
  CHECK(rt.outcome.detail == "refused");
  CHECK(ok(R"({"type":"result","id":1,"verdict":"retry"})").outcome.reason == "handler_failed");

  auto d = ok(R"({"type":"result","id":19,"verdict":"dead_letter","reason":"bad_payload"})");
  CHECK(d.outcome.verdict == Verdict::DeadLetter);
  CHECK(d.outcome.reason == "bad_payload");
  CHECK(ok(R"({"type":"result","id":1,"verdict":"dead_letter"})").outcome.reason == "handler_rejected");
  // A CR before the newline is tolerated; null means absent.
  CHECK(ok("{\"type\":\"result\",\"id\":3,\"verdict\":\"ack\",\"reason\":null}\r").id == 3);
}

TEST_CASE("worker answers: garbage is a protocol error", "[worker]") {
  CHECK(bad("").find("not JSON") == 0);
  CHECK(bad("hello").find("not JSON") == 0);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"ack"} trailing)").find("not JSON") == 0);
  CHECK(bad(R"({"type":"result","id":1,)").find("not JSON") == 0);
  CHECK(bad("{\"type\":\"result\",\"id\":1,\"verdict\":\"\xff\"}").find("not JSON") == 0);  // not UTF-8
  CHECK(bad("[1,2]") == "not a JSON object but an array");
  CHECK(bad("42") == "not a JSON object but a number");
  CHECK(bad("null") == "not a JSON object but null");
  CHECK(bad(R"("ready")") == "not a JSON object but a string");
  CHECK(bad(R"({"id":1,"verdict":"ack"})") == "no \"type\" (a string)");
  CHECK(bad(R"({"type":7})") == "no \"type\" (a string)");
  CHECK(bad(R"({"type":"event","id":1})").find("unknown type") == 0);
  CHECK(bad(R"({"type":"ready"})").find("ready without") == 0);
  CHECK(bad(R"({"type":"ready","protocol":"1"})").find("ready without") == 0);
  CHECK(bad(R"({"type":"ready","protocol":1.5})").find("ready without") == 0);
  for (const char* id : {"", R"("id":"17",)", R"("id":0,)", R"("id":-1,)", R"("id":1.5,)", R"("id":null,)"}) {
    std::string line = std::string(R"({"type":"result",)") + id + R"("verdict":"ack"})";
    CHECK(bad(line).find("without \"id\"") != std::string::npos);
  }
  CHECK(bad(R"({"type":"result","id":1})").find("without \"verdict\"") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":true})").find("without \"verdict\"") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"ACK"})").find("unknown verdict") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"dead-letter"})").find("unknown verdict") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","delay_ms":-5})").find("delay_ms") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","delay_ms":"5"})").find("delay_ms") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","reason":"has space"})").find("reason") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","reason":""})").find("reason") != std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","reason":5})").find("reason") != std::string::npos);
  std::string long_reason(65, 'a');
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","reason":")" + long_reason + "\"}").find("reason") !=
        std::string::npos);
  CHECK(bad(R"({"type":"result","id":1,"verdict":"retry","detail":{}})").find("detail") != std::string::npos);
  // An error message quotes garbage short and printable.
  std::string noise(5000, 'x');
  CHECK(bad(noise).size() < 200);
  CHECK(bad("\x01\x02").find("\\u0001") != std::string::npos);
}

TEST_CASE("worker answers: deep nesting is refused before any parse (it would exhaust the stack)", "[worker]") {
  // 200 000 levels, far under the line cap: a recursive parse or writer dies on it.
  std::string deep = std::string(200000, '[') + std::string(200000, ']');
  CHECK(bad(deep) == "nested deeper than 66 levels");
  std::string emit = R"({"type":"result","id":1,"verdict":"ack","emit":[{"event_type":"b","payload":)" +
                     std::string(100000, '[') + std::string(100000, ']') + "}]}";
  CHECK(bad(emit) == "nested deeper than 66 levels");
  // Brackets inside strings do not count.
  std::string quoted = R"({"type":"result","id":1,"verdict":"ack","detail":")" + std::string(1000, '[') + "\"}";
  CHECK(ok(quoted).outcome.verdict == er::dispatch::Verdict::Ack);
  // Nesting the emit rules allow (64 inside an emit object) still parses.
  std::string allowed = R"({"type":"result","id":1,"verdict":"ack","emit":[{"event_type":"b","payload":)" +
                        std::string(63, '[') + std::string(63, ']') + "}]}";
  CHECK(ok(allowed).outcome.emits.size() == 1);
}

TEST_CASE("worker answers: detail and delay are bounded", "[worker]") {
  std::string long_detail(3000, 'd');
  auto a = ok(R"({"type":"result","id":1,"verdict":"retry","detail":")" + long_detail + "\"}");
  CHECK(a.outcome.detail.size() == kMaxDetailBytes);
  // Cut on a character boundary: 1023 ASCII bytes, then a 2-byte character.
  std::string mixed(1023, 'a');
  mixed += "\xc3\xa9";
  auto m = ok(R"({"type":"result","id":1,"verdict":"retry","detail":")" + mixed + "\"}");
  CHECK(m.outcome.detail == std::string(1023, 'a'));
  auto big = ok(R"({"type":"result","id":1,"verdict":"retry","delay_ms":18446744073709551615})");
  CHECK(big.outcome.retry_delay == std::chrono::hours(24));
  // Delay and reason mean nothing for ack.
  auto ack = ok(R"({"type":"result","id":1,"verdict":"ack","delay_ms":5,"reason":"x"})");
  CHECK(ack.outcome.retry_delay.count() == 0);
  CHECK(ack.outcome.reason.empty());
}

TEST_CASE("worker answers: emit", "[worker]") {
  auto a = ok(R"({"type":"result","id":20,"verdict":"ack","emit":[
      {"event_type":"rag.dfn_generated", "aggregate_id":"d-1", "payload":{"dfn":"x","n":[1,2]}},
      {"event_type":"b"}]})");
  REQUIRE(a.outcome.verdict == Verdict::Ack);
  REQUIRE(a.outcome.emits.size() == 2);
  CHECK(a.outcome.emits[0] == R"({"event_type":"rag.dfn_generated","aggregate_id":"d-1","payload":{"dfn":"x","n":[1,2]}})");
  CHECK(a.outcome.emits[1] == R"({"event_type":"b"})");
  CHECK(ok(R"({"type":"result","id":1,"verdict":"ack","emit":[]})").outcome.emits.empty());

  // With another verdict it is ignored (and said so).
  auto r = ok(R"({"type":"result","id":1,"verdict":"retry","emit":[{"event_type":"b"}]})");
  CHECK(r.emit_ignored);
  CHECK(r.outcome.emits.empty());
  CHECK(r.outcome.verdict == Verdict::Retry);

  // A bad emit dead-letters the event (emit_invalid); the answer itself is fine.
  auto invalid = [](const std::string& emit) {
    auto x = ok(R"({"type":"result","id":1,"verdict":"ack","emit":)" + emit + "}");
    CHECK(x.outcome.verdict == Verdict::DeadLetter);
    CHECK(x.outcome.reason == "emit_invalid");
    CHECK(x.outcome.emits.empty());
    return x.outcome.detail;
  };
  CHECK(invalid(R"({"event_type":"b"})") == "emit is an object, not an array");
  CHECK(invalid(R"("b")") == "emit is a string, not an array");
  CHECK(invalid(R"([{"event_type":"b"}, 5])") == "emit[1] is a number, not an object");
  CHECK(invalid(R"([{"payload":{}}])") == "emit[0] has no event_type (a non-empty string)");
  CHECK(invalid(R"([{"event_type":""}])") == "emit[0] has no event_type (a non-empty string)");
  CHECK(invalid(R"([{"event_type":["b"]}])") == "emit[0] has no event_type (a non-empty string)");
  std::string many = "[";
  for (size_t i = 0; i <= er::settle::kMaxEmits; ++i) many += std::string(i ? "," : "") + R"({"event_type":"b"})";
  many += "]";
  CHECK(invalid(many) == "emit has 1001 events, at most 1000 allowed");
}

TEST_CASE("worker event lines: one line of JSON, metadata escaped", "[worker]") {
  er::event::Envelope env;
  env.event_type = "rag.x";
  env.event_id = "id-\"1\"\n";
  env.correlation_id = "c\xff";  // not UTF-8
  // A pretty-printed body: its line breaks must not end the line.
  const char* body = "{\n  \"event_type\": \"rag.x\",\r\n  \"payload\": {\"s\": \"a\\nb\"}\n}";
  EventView v{body, "rag.x", "ex", "q", &env, 3, true};
  std::string line;
  append_event_line(line, 42, v);
  REQUIRE(line.back() == '\n');
  CHECK(line.find('\n') == line.size() - 1);
  rapidjson::Document d;
  d.Parse(line.data(), line.size() - 1);
  REQUIRE_FALSE(d.HasParseError());
  CHECK(std::string(d["type"].GetString()) == "event");
  CHECK(d["id"].GetUint64() == 42);
  CHECK(std::string(d["event_id"].GetString()) == "id-\"1\"\n");
  CHECK(std::string(d["correlation_id"].GetString()) == "c\xef\xbf\xbd");
  CHECK(d["aggregate_id"].IsNull());
  CHECK(d["aggregate_type"].IsNull());
  CHECK(std::string(d["queue"].GetString()) == "q");
  CHECK(d["attempt"].GetInt() == 3);
  CHECK(d["redelivered"].GetBool());
  CHECK(std::string(d["event"]["payload"]["s"].GetString()) == "a\nb");
}
