#include "amqp/connection.hpp"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include <cstring>
#include <regex>
#include <vector>

#include "util/log.hpp"

namespace er::amqp {

void ConnectionDeleter::operator()(amqp_connection_state_t c) const noexcept {
  amqp_destroy_connection(c);
}

namespace {

std::string server_text(const amqp_rpc_reply_t& r, int* code) {
  *code = 0;
  if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
    auto* m = static_cast<amqp_channel_close_t*>(r.reply.decoded);
    *code = m->reply_code;
    return std::string(view(m->reply_text));
  }
  if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
    auto* m = static_cast<amqp_connection_close_t*>(r.reply.decoded);
    *code = m->reply_code;
    return std::string(view(m->reply_text));
  }
  return "unexpected method " + std::to_string(r.reply.id);
}

// "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in
// vhost '/': received none but current is the value '5' of type 'signedint'"
std::string explain_precondition(const std::string& text) {
  static const std::regex re(
      R"(inequivalent arg '([^']*)' for (queue|exchange) '([^']*)' in vhost '([^']*)': received (.*) but current is (.*))");
  std::smatch m;
  if (!std::regex_search(text, m, re)) return text;
  std::string what = m[2].str() + " '" + m[3].str() + "'";
  if (m[1].str() == "x-queue-type")
    // A queue's type never changes in place: its messages must move to a new queue.
    return what + " already exists on the broker (vhost '" + m[4].str() + "') as another queue type: the config " +
           "declares " + m[5].str() + " but the broker has " + m[6].str() +
           ". RabbitMQ cannot change a queue's type in place: follow \"Migrating a queue to quorum\" in " +
           "docs/scaling.md, or set the queue's 'type' back to what the broker has";
  return what + " already exists on the broker (vhost '" + m[4].str() + "') with a different '" + m[1].str() +
         "' argument: the config declares " + m[5].str() + " but the broker has " + m[6].str() +
         ". Delete the " + m[2].str() + " or make the config match it";
}

}  // namespace

std::string describe_reply(const amqp_rpc_reply_t& r, std::string_view context) {
  std::string out(context);
  out += ": ";
  switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      out += "ok";
      break;
    case AMQP_RESPONSE_NONE:
      out += "no reply from the broker (missing RPC reply type)";
      break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      out += amqp_error_string2(r.library_error);
      break;
    case AMQP_RESPONSE_SERVER_EXCEPTION: {
      int code = 0;
      std::string text = server_text(r, &code);
      if (code == AMQP_PRECONDITION_FAILED) {
        out += explain_precondition(text);
      } else if (code == AMQP_ACCESS_REFUSED) {
        out += "access refused (check the user's permissions on the vhost): " + text;
      } else if (code == AMQP_NOT_FOUND) {
        out += "not found: " + text;
      } else {
        out += text;
      }
      break;
    }
  }
  return out;
}

void check_reply(const amqp_rpc_reply_t& r, std::string_view context) {
  if (r.reply_type == AMQP_RESPONSE_NORMAL) return;
  int code = 0;
  bool channel = false;
  if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
    server_text(r, &code);
    channel = r.reply.id == AMQP_CHANNEL_CLOSE_METHOD;
  }
  throw AmqpError(describe_reply(r, context), code, channel);
}

ConnectOptions connect_options(const config::BrokerConfig& b, size_t url_index) {
  ConnectOptions o;
  o.url = b.urls.empty() ? b.url : b.urls[url_index % b.urls.size()];
  o.heartbeat = b.heartbeat;
  o.rpc_timeout = b.rpc_timeout;
  o.tls = {b.tls.ca_file, b.tls.cert_file, b.tls.key_file, b.tls.verify_peer, b.tls.verify_hostname};
  return o;
}

Connection Connection::open(const ConnectOptions& opts) {
  const std::string masked = log::mask_url(opts.url);
  std::vector<char> url(opts.url.begin(), opts.url.end());
  url.push_back('\0');
  amqp_connection_info info;
  amqp_default_connection_info(&info);
  if (amqp_parse_url(url.data(), &info) != AMQP_STATUS_OK)
    throw AmqpError("broker URL " + masked + " is not a valid amqp:// URL");
  // "amqp://host:5672/" names the empty vhost by the AMQP URI spec, but the
  // services' clients (aio-pika, amqplib) read it as "/": follow them.
  if (info.vhost == nullptr || info.vhost[0] == '\0') info.vhost = const_cast<char*>("/");

  Connection c;
  c.conn_.reset(amqp_new_connection());
  if (!c.conn_) throw AmqpError("out of memory creating a connection");
  c.peer_ = std::string(info.host) + ":" + std::to_string(info.port);

  amqp_socket_t* sock = nullptr;
  if (info.ssl) {
    sock = amqp_ssl_socket_new(c.conn_.get());
    if (!sock) throw AmqpError("cannot create a TLS socket");
    const auto& t = opts.tls;
    const std::string ca = t.ca_file.empty() ? "/etc/ssl/certs/ca-certificates.crt" : t.ca_file;
    if (t.verify_peer && amqp_ssl_socket_set_cacert(sock, ca.c_str()) != AMQP_STATUS_OK)
      throw AmqpError("TLS: cannot load CA certificates from " + ca);
    if (!t.cert_file.empty() &&
        amqp_ssl_socket_set_key(sock, t.cert_file.c_str(), t.key_file.c_str()) != AMQP_STATUS_OK)
      throw AmqpError("TLS: cannot load the client certificate " + t.cert_file + " with key " + t.key_file);
    amqp_ssl_socket_set_verify_peer(sock, t.verify_peer ? 1 : 0);
    amqp_ssl_socket_set_verify_hostname(sock, t.verify_hostname ? 1 : 0);
  } else {
    sock = amqp_tcp_socket_new(c.conn_.get());
    if (!sock) throw AmqpError("cannot create a TCP socket");
  }
  auto secs = opts.connect_timeout.count() / 1000;
  timeval tv{static_cast<time_t>(secs), static_cast<suseconds_t>((opts.connect_timeout.count() % 1000) * 1000)};
  int rc = amqp_socket_open_noblock(sock, info.host, info.port, &tv);
  if (rc != AMQP_STATUS_OK)
    throw AmqpError("cannot connect to " + c.peer_ + " (" + masked + "): " + amqp_error_string2(rc) +
                    (info.ssl && rc == AMQP_STATUS_SSL_CONNECTION_FAILED
                         ? " (TLS handshake failed: check ca_file, the server certificate's name, and client certificates)"
                         : ""));

  int heartbeat_s = static_cast<int>((opts.heartbeat.count() + 999) / 1000);
  // rabbitmq-c's default is 128 KiB frames; 131072 matches RabbitMQ's default.
  // Without these capabilities the broker neither tells us that a consumer
  // was cancelled (queue deleted) nor that publishing is blocked.
  amqp_table_entry_t caps[2];
  caps[0].key = amqp_cstring_bytes("consumer_cancel_notify");
  caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
  caps[0].value.value.boolean = 1;
  caps[1].key = amqp_cstring_bytes("connection.blocked");
  caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
  caps[1].value.value.boolean = 1;
  amqp_table_entry_t client_props[2];
  client_props[0].key = amqp_cstring_bytes("capabilities");
  client_props[0].value.kind = AMQP_FIELD_KIND_TABLE;
  client_props[0].value.value.table = amqp_table_t{2, caps};
  client_props[1].key = amqp_cstring_bytes("connection_name");
  client_props[1].value.kind = AMQP_FIELD_KIND_UTF8;
  client_props[1].value.value.bytes = amqp_cstring_bytes("event-router");
  amqp_table_t props_table{2, client_props};
  // The login waits no longer than any other reply.
  timeval handshake{static_cast<time_t>(opts.rpc_timeout.count() / 1000),
                    static_cast<suseconds_t>((opts.rpc_timeout.count() % 1000) * 1000)};
  amqp_set_handshake_timeout(c.conn_.get(), &handshake);
  amqp_rpc_reply_t r =
      amqp_login_with_properties(c.conn_.get(), info.vhost, AMQP_DEFAULT_MAX_CHANNELS, AMQP_DEFAULT_FRAME_SIZE,
                                 heartbeat_s, &props_table, AMQP_SASL_METHOD_PLAIN, info.user, info.password);
  if (r.reply_type != AMQP_RESPONSE_NORMAL) {
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_CONNECTION_CLOSED)
      throw AmqpError("login to " + masked + " refused: wrong user or password, or no access to vhost '" +
                      std::string(info.vhost) + "'");
    std::string msg = describe_reply(r, "logging in to " + masked);
    if (info.ssl && r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_SSL_ERROR)
      msg += " (the broker may require a client certificate: set broker.tls.cert_file and key_file)";
    throw AmqpError(msg);
  }

  // From here on no RPC waits longer than this (the default is forever).
  timeval rpc{static_cast<time_t>(opts.rpc_timeout.count() / 1000),
              static_cast<suseconds_t>((opts.rpc_timeout.count() % 1000) * 1000)};
  amqp_set_rpc_timeout(c.conn_.get(), &rpc);

  const amqp_table_t* props = amqp_get_server_properties(c.conn_.get());
  for (int i = 0; props && i < props->num_entries; ++i) {
    const auto& e = props->entries[i];
    if (view(e.key) == "version" && e.value.kind == AMQP_FIELD_KIND_UTF8)
      c.server_version_ = std::string(view(e.value.value.bytes));
  }
  return c;
}

Connection::~Connection() {
  if (conn_ && !closed_) close();
}

void Connection::open_channel(amqp_channel_t ch) {
  amqp_channel_open(conn_.get(), ch);
  check_reply(amqp_get_rpc_reply(conn_.get()), "opening channel " + std::to_string(ch));
}

amqp_channel_t Connection::channel_max() const {
  int n = amqp_get_channel_max(conn_.get());
  // 0 means "no limit" in AMQP; rabbitmq-c asks for 2047 anyway.
  return static_cast<amqp_channel_t>(n <= 0 || n > 65535 ? 65535 : n);
}

void Connection::close() noexcept {
  if (!conn_ || closed_) return;
  closed_ = true;
  amqp_connection_close(conn_.get(), AMQP_REPLY_SUCCESS);
}

}  // namespace er::amqp
