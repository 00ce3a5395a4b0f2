// The umbrella header for one process brings no distributed code: no c10d, no Reducer, no POSIX process
// headers (compiled with LibTorch, fabric/fabric.hpp alone).
#include <fabric/fabric.hpp>

// fabric's c10d adapter and LibTorch's c10d headers define these.
#if defined(FABRIC_HAS_GLOO) || defined(FABRIC_HAS_NCCL) || defined(FABRIC_REDUCER_COMPAT) || defined(C10D_ENV_NOT_SET)
#error "fabric/fabric.hpp included c10d (the distributed engine); it belongs in fabric/distributed.hpp"
#endif
// glibc's guards of the process headers the launchers use.
#if defined(_SYS_WAIT_H) || defined(_SYS_PRCTL_H) || defined(_SPAWN_H) || defined(_SYS_SOCKET_H)
#error "fabric/fabric.hpp included a POSIX process or socket header; it belongs in fabric/distributed.hpp"
#endif
#if defined(FABRIC_DISTRIBUTED)
#error "this test must be compiled without FABRIC_DISTRIBUTED"
#endif

int main() { return fabric::Strategy<fabric::SingleDevice> ? 0 : 1; }
