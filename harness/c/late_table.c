/* A test plugin that exports only {name, init} in ncclNetPlugin_v6 and fills in the rest of the
 * table during init, as nccl-rdma-sharp-plugins does. A driver that copies the table at dlopen
 * sees NULL entries; one that reads through the symbol at each call works. init also logs through
 * the logger it is given with a real format, as NCCL's WARN macro does. */
#include <stddef.h>
#include <stdint.h>
#include "rccl_net.h"

static ncclDebugLogger_t logger;

static ncclResult_t late_devices(int *ndev) {
  *ndev = 2;
  return ncclSuccess;
}

static char late_name[] = "late0";

static ncclResult_t late_properties(int dev, ncclNetProperties_v6_t *props) {
  if (dev < 0 || dev > 1) return ncclInvalidArgument;
  props->name = late_name;
  props->pciPath = NULL;
  props->guid = 0x1234;
  props->ptrSupport = NCCL_PTR_HOST;
  props->speed = 100000 + dev;
  props->port = 1;
  props->latency = 0;
  props->maxComms = 1;
  props->maxRecvs = 1;
  return ncclSuccess;
}

static ncclResult_t late_init(ncclDebugLogger_t log);

/* rccl_net.h declares the symbol const; this one is written by init, so it is defined under
 * another C name with the exported symbol name. */
ncclNet_v6_t late_table __asm__("ncclNetPlugin_v6") = {
    .name = "late-table",
    .init = late_init,
};

static ncclResult_t late_init(ncclDebugLogger_t log) {
  logger = log;
  late_table.devices = late_devices;
  late_table.getProperties = late_properties;
  if (logger != NULL)
    logger(NCCL_LOG_WARN, NCCL_NET, __FILE__, __LINE__, "late table: %d devices, %s, %lu", 2, "filled in by init",
           (unsigned long)sizeof(ncclNet_v6_t));
  return ncclSuccess;
}
