#pragma once
// libpq, loaded on first use (dlopen, RTLD_NOW) instead of linked: linking
// maps libpq and its ~16 dependencies (Kerberos, LDAP, GnuTLS, p11-kit) into
// every daemon, about 3 MiB of resident memory at start, for a store most
// deployments never configure. Only the PostgreSQL dedupe store calls it.
#include <libpq-fe.h>

namespace er::dedupe {

struct LibPq {
  decltype(&::PQclear) PQclear;
  decltype(&::PQcmdTuples) PQcmdTuples;
  decltype(&::PQconnectPoll) PQconnectPoll;
  decltype(&::PQconnectStart) PQconnectStart;
  decltype(&::PQconsumeInput) PQconsumeInput;
  decltype(&::PQenterPipelineMode) PQenterPipelineMode;
  decltype(&::PQerrorMessage) PQerrorMessage;
  decltype(&::PQfinish) PQfinish;
  decltype(&::PQflush) PQflush;
  decltype(&::PQgetResult) PQgetResult;
  decltype(&::PQgetlength) PQgetlength;
  decltype(&::PQgetvalue) PQgetvalue;
  decltype(&::PQisBusy) PQisBusy;
  decltype(&::PQntuples) PQntuples;
  decltype(&::PQpipelineSync) PQpipelineSync;
  decltype(&::PQresultErrorMessage) PQresultErrorMessage;
  decltype(&::PQresultStatus) PQresultStatus;
  decltype(&::PQsendQuery) PQsendQuery;
  decltype(&::PQsendQueryPrepared) PQsendQueryPrepared;
  decltype(&::PQsetNoticeProcessor) PQsetNoticeProcessor;
  decltype(&::PQsetnonblocking) PQsetnonblocking;
  decltype(&::PQsocket) PQsocket;
  decltype(&::PQstatus) PQstatus;
};

// The loaded library; the first call loads it (and only that call can fail:
// std::runtime_error naming the library and what to install).
const LibPq& libpq();

}  // namespace er::dedupe
