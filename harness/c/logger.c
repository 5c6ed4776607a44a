/* The logger entry point handed to a plugin's init: ncclDebugLogger_t, printf-style and variadic.
 * Plugins pass their own formats and arguments (NCCL's WARN/INFO/TRACE macros), so the line is
 * formatted here with vsnprintf into a bounded buffer and handed, finished, to one Rust function.
 * A line longer than the buffer is cut and ends in "..."; a NULL format or file is an empty string. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* In harness/src/log.rs: calls the sink chosen by logger::<S>(). */
void halo_log_dispatch(int level, unsigned long flags, const char *file, int line, const char *msg);

#define HALO_LOG_LINE_MAX 4096

void halo_log_entry(int level, unsigned long flags, const char *file, int line, const char *fmt, ...) {
  char buf[HALO_LOG_LINE_MAX];
  buf[0] = '\0';
  if (fmt != NULL) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) {
      /* An encoding error: keep the format itself, which is at least a hint. */
      snprintf(buf, sizeof buf, "(unformattable) %s", fmt);
    } else if ((size_t)n >= sizeof buf) {
      memcpy(buf + sizeof buf - 4, "...", 4);
    }
  }
  halo_log_dispatch(level, flags, file != NULL ? file : "", line, buf);
}

/* Its size, for the tests. */
const unsigned long halo_log_line_max = HALO_LOG_LINE_MAX;
