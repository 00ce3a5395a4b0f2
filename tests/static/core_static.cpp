// Compile-time tests of the torch-free core. This file is compiled WITHOUT LibTorch on the include
// path: if a core header pulled in torch, it would not build.
#include <fabric/callbacks/progress.hpp>
#include <fabric/core/concepts.hpp>
#include <fabric/core/config.hpp>
#include <fabric/core/error.hpp>
#include <fabric/core/guard.hpp>
#include <fabric/core/hooks.hpp>
#include <fabric/core/options.hpp>
#include <fabric/core/rank_zero.hpp>
#include <fabric/core/type_list.hpp>
#include <fabric/core/version.hpp>
#include <fabric/fwd.hpp>
#include <fabric/loggers/csv.hpp>
#include <fabric/loggers/logger.hpp>
#include <fabric/loggers/tensorboard.hpp>
#include <fabric/strategies/environments/detect.hpp>
#include <fabric/strategies/launchers/process_set.hpp>
#include <fabric/strategies/launchers/subprocess.hpp>

#include <string>
#include <tuple>
#include <type_traits>

// Every LibTorch header pulls in c10/macros/Macros.h, which defines this guard.
#if defined(C10_MACROS_MACROS_H_) || defined(TORCH_VERSION_MAJOR)
#error "a torch-free core header included LibTorch"
#endif
#if __has_include(<torch/torch.h>)
#error "the core static test must be compiled without LibTorch's API headers on the include path"
#endif

namespace {

// Type lists.
using L = fabric::TypeList<int, double, char>;
static_assert(L::size == 3);
static_assert(fabric::contains_v<double, L>);
static_assert(!fabric::contains_v<float, L>);
static_assert(fabric::is_unique_v<L>);
static_assert(!fabric::is_unique_v<fabric::TypeList<int, double, int>>);
static_assert(fabric::is_unique_v<fabric::TypeList<>>);

constexpr int count_types() {
  int n = 0;
  fabric::for_each_type(L{}, [&]<class T>() { n += sizeof(T) > 0 ? 1 : 0; });
  return n;
}
static_assert(count_types() == 3);

// Policies are told apart by their category tag (the complete concepts, which need LibTorch's types,
// are checked in policies_static.cpp).
struct FakeAccelerator {
  using category = fabric::accelerator_tag;
  static constexpr std::string_view name = "fake";
};
struct FakeStrategy {
  using category = fabric::strategy_tag;
  static constexpr std::string_view name = "fake";
};
struct FakePrecision {
  using category = fabric::precision_tag;
  static constexpr std::string_view name = "fake";
};
struct NotAPolicy {};

static_assert(fabric::PolicyOf<FakeAccelerator, fabric::accelerator_tag>);
static_assert(!fabric::PolicyOf<FakeStrategy, fabric::accelerator_tag>);
static_assert(!fabric::PolicyOf<NotAPolicy, fabric::accelerator_tag>);
static_assert(fabric::PolicyOf<FakeStrategy, fabric::strategy_tag>);
static_assert(!fabric::PolicyOf<FakeAccelerator, fabric::strategy_tag>);
static_assert(fabric::PolicyOf<FakePrecision, fabric::precision_tag>);
static_assert(!fabric::PolicyOf<FakeStrategy, fabric::precision_tag>);
static_assert(fabric::Policy<FakeAccelerator> && !fabric::Policy<NotAPolicy> && !fabric::Policy<int>);
static_assert(fabric::Callback<NotAPolicy> && !fabric::Callback<int>);

// Cluster environments: the built-in ones and a user's satisfy the concept; incomplete types do not.
static_assert(fabric::ClusterEnvironment<fabric::LightningEnvironment>);
static_assert(fabric::ClusterEnvironment<fabric::TorchElasticEnvironment>);
static_assert(fabric::ClusterEnvironment<fabric::SLURMEnvironment>);
static_assert(fabric::ClusterEnvironment<fabric::LSFEnvironment>);
static_assert(fabric::ClusterEnvironment<fabric::MPIEnvironment>);
static_assert(fabric::ClusterEnvironment<fabric::KubeflowEnvironment>);
static_assert(fabric::ClusterEnvironment<fabric::AutoEnvironment>);
struct MyScheduler {
  static constexpr std::string_view name = "my_scheduler";
  static bool detect(const fabric::EnvLookup& env) { return env("MY_RANK").has_value(); }
  fabric::Topology topology(const fabric::EnvLookup&, int, int) const { return {}; }
};
struct NoTopology {
  static constexpr std::string_view name = "no_topology";
  static bool detect(const fabric::EnvLookup&) { return true; }
};
static_assert(fabric::ClusterEnvironment<MyScheduler>);
static_assert(fabric::ClusterEnvironment<fabric::DetectEnvironment<MyScheduler, fabric::SLURMEnvironment>>);
static_assert(!fabric::ClusterEnvironment<NoTopology> && !fabric::ClusterEnvironment<NotAPolicy>);
static_assert(fabric::AutoEnvironment::name == "auto" && fabric::LSFEnvironment::name == "lsf");

// Hooks: declared or not, invocable or not, found through inheritance, overloads and final classes.
FABRIC_HOOK(on_custom_event);
struct WithHook {
  int calls = 0;
  void on_custom_event(int x) { calls += x; }
};
struct WithoutHook {};
struct Overloaded {
  void on_custom_event(int) {}
  void on_custom_event(std::string) {}
};
struct Derived : WithHook {};
struct Final final {
  void on_custom_event() {}
};
struct Generic {
  void on_custom_event(auto&&...) {}
};
static_assert(fabric::Hook<on_custom_event_hook>);
static_assert(on_custom_event_hook::declared_by<WithHook>());
static_assert(!on_custom_event_hook::declared_by<WithoutHook>());
static_assert(on_custom_event_hook::declared_by<Overloaded>());
static_assert(on_custom_event_hook::declared_by<Derived>());
static_assert(on_custom_event_hook::declared_by<Final>());
static_assert(on_custom_event_hook::declared_by<Generic>());
static_assert(!on_custom_event_hook::declared_by<fabric::hooks::on_train_end_hook>());
static_assert(on_custom_event_hook::invocable_by<WithHook, int>);
static_assert(!on_custom_event_hook::invocable_by<WithHook, std::string>);
static_assert(on_custom_event_hook::invocable_by<Overloaded, std::string>);
static_assert(on_custom_event_hook::name == "on_custom_event");
static_assert(fabric::hooks::on_train_epoch_end.name == "on_train_epoch_end");

// Options are aggregates with Lightning's defaults.
static_assert(std::is_aggregate_v<fabric::Options>);
static_assert(std::is_aggregate_v<fabric::ClipOptions>);
static_assert(fabric::Options{}.devices == fabric::Options::auto_devices && fabric::Options{}.num_nodes == 1);
static_assert(fabric::ClipOptions{}.norm_type == 2.0);

static_assert(fabric::version() == "0.1.0");
static_assert(FABRIC_VERSION == 100);

}  // namespace

int main() {
  std::tuple<WithHook, WithoutHook, Derived> callbacks;
  int two = 2;
  fabric::detail::dispatch<on_custom_event_hook>(callbacks, two);
  return std::get<0>(callbacks).calls == 2 && std::get<2>(callbacks).calls == 2 ? 0 : 1;
}
