#pragma once
// Forward declarations of fabric's public types. Torch-free.

namespace fabric {

struct CPU;
struct CUDA;
struct Auto;
struct PrecisionBase;
struct FP32;
class StrategyBase;
class SingleDevice;
class DP;
class ParallelStrategy;
class DDP;
class GradScaler;
class AutocastGuard;
class DefaultDtypeGuard;
struct Options;
struct SetupOptions;
struct DataOptions;
struct LoaderOptions;
struct ClipOptions;
struct StrategyOptions;
struct ParallelOptions;
class Error;
class Logger;
class CSVLogger;
class ProgressBar;
class TensorBoardLogger;
class StateEntry;
class NativeCheckpointIO;
class AnyCheckpointIO;
class AnyEnvironment;
struct Topology;
class DistributedSampler;
template <class... Ts>
struct TypeList;
template <class M, class F>
class Module;
template <class O, class F>
class Optimizer;
template <class L>
class DataLoader;
struct CaptureOptions;
template <class F, class Fn>
class CapturedStep;

}  // namespace fabric
