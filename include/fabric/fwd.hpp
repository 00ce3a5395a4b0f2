#pragma once
// Forward declarations of fabric's public types. Torch-free.

namespace fabric {

struct CPU;
struct CUDA;
class SingleDevice;
struct FP32;
class GradScaler;
class AutocastGuard;
class DefaultDtypeGuard;
struct Options;
struct SetupOptions;
struct DataOptions;
struct LoaderOptions;
struct ClipOptions;
class Error;
class Logger;
class CSVLogger;
class StateEntry;
class DistributedSampler;
template <class... Ts>
struct TypeList;
template <class M, class F>
class Module;
template <class O, class F>
class Optimizer;
template <class L>
class DataLoader;

}  // namespace fabric
