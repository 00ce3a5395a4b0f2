/* A debugging aid for machines without gdb (tools/gpu.sh): preloaded with LD_PRELOAD, it prints the
 * stack of a process that crashes with SIGSEGV or SIGBUS to stderr. It keeps its handler installed
 * by ignoring later sigaction() calls for those signals (Catch2 installs its own on an alternate
 * stack, from which the crashing stack cannot be unwound). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

static int installed = 0;

static void on_fatal(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  static const char header[] = "\n==== segv_backtrace: fatal signal, stack:\n";
  if (write(2, header, sizeof header - 1) < 0) _exit(128 + sig);
  backtrace_symbols_fd(frames, n, 2);
  _exit(128 + sig);
}

int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
  static int (*real)(int, const struct sigaction*, struct sigaction*) = 0;
  if (!real) real = (int (*)(int, const struct sigaction*, struct sigaction*))dlsym(RTLD_NEXT, "sigaction");
  if (installed && act && (sig == SIGSEGV || sig == SIGBUS)) return real(sig, 0, old);
  return real(sig, act, old);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction sa = {0};
  sa.sa_handler = on_fatal;
  sigaction(SIGSEGV, &sa, 0);
  sigaction(SIGBUS, &sa, 0);
  installed = 1;
}
