#pragma once
// Hooks: compile-time names that `Fabric::call` dispatches to callbacks. Torch-free.
//
// A hook is a constant object made by FABRIC_HOOK(name). A callback implements it by declaring a
// member function of that name; callbacks without it are skipped at compile time. A callback's hook gets
// the longest prefix of call()'s arguments that it takes (so `on_train_epoch_end()` ignores the epoch
// and loss given to call()); one that takes none of them is a compile error.

#include "fabric/core/config.hpp"

#include <concepts>
#include <cstddef>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

/// Declares a hook named `hook` in the current namespace, e.g. `FABRIC_HOOK(on_best_model);`.
#define FABRIC_HOOK(hook)                                            \
  struct hook##_hook {                                               \
    static constexpr ::std::string_view name = #hook;                \
    struct fallback_ {                                               \
      int hook;                                                      \
    };                                                               \
    template <class C>                                               \
    struct probe_ : C, fallback_ {};                                 \
    template <class C>                                               \
    static constexpr bool declared_by() noexcept {                   \
      if constexpr (::std::is_final_v<C>) {                          \
        return requires { &C::hook; };                               \
      } else {                                                       \
        return !requires { &probe_<C>::hook; };                      \
      }                                                              \
    }                                                                \
    template <class C, class... A>                                   \
    static constexpr bool invocable_by = requires(C & c, A&&... a) { \
      c.hook(static_cast<A&&>(a)...);                                \
    };                                                               \
    template <class C, class... A>                                   \
    static decltype(auto) invoke(C& c, A&&... a) {                   \
      return c.hook(static_cast<A&&>(a)...);                         \
    }                                                                \
  };                                                                 \
  inline constexpr hook##_hook hook {}

namespace fabric {

/// A hook object as made by FABRIC_HOOK: it knows its name and how to find and call it on a callback.
template <class H>
concept Hook = requires {
  { H::name } -> std::convertible_to<std::string_view>;
  typename H::fallback_;
};

/// Lightning's callback hook names, predeclared.
namespace hooks {
FABRIC_HOOK(setup);
FABRIC_HOOK(teardown);
FABRIC_HOOK(on_after_setup);
FABRIC_HOOK(on_fit_start);
FABRIC_HOOK(on_fit_end);
FABRIC_HOOK(on_train_start);
FABRIC_HOOK(on_train_end);
FABRIC_HOOK(on_train_epoch_start);
FABRIC_HOOK(on_train_epoch_end);
FABRIC_HOOK(on_train_batch_start);
FABRIC_HOOK(on_train_batch_end);
FABRIC_HOOK(on_validation_start);
FABRIC_HOOK(on_validation_end);
FABRIC_HOOK(on_validation_epoch_start);
FABRIC_HOOK(on_validation_epoch_end);
FABRIC_HOOK(on_validation_batch_start);
FABRIC_HOOK(on_validation_batch_end);
FABRIC_HOOK(on_test_start);
FABRIC_HOOK(on_test_end);
FABRIC_HOOK(on_test_epoch_start);
FABRIC_HOOK(on_test_epoch_end);
FABRIC_HOOK(on_test_batch_start);
FABRIC_HOOK(on_test_batch_end);
FABRIC_HOOK(on_predict_start);
FABRIC_HOOK(on_predict_end);
FABRIC_HOOK(on_before_backward);
FABRIC_HOOK(on_after_backward);
FABRIC_HOOK(on_before_optimizer_step);
FABRIC_HOOK(on_after_optimizer_step);
FABRIC_HOOK(on_before_zero_grad);
FABRIC_HOOK(on_save_checkpoint);
FABRIC_HOOK(on_load_checkpoint);
FABRIC_HOOK(on_exception);
/// fabric's own: `Fabric::log` and `Fabric::log_dict` call `on_log_metrics(metrics, step)` on global rank
/// zero, after the loggers (fabric::ProgressBar shows the metrics this way).
FABRIC_HOOK(on_log_metrics);
}  // namespace hooks

namespace detail {

/// True when the callback's hook takes the first N of the arguments.
template <Hook H, class C, class Args, std::size_t... I>
constexpr bool invocable_with_first(std::index_sequence<I...> /*first*/) noexcept {
  return H::template invocable_by<C, std::tuple_element_t<I, Args>...>;
}

/// Calls the callback's hook with the longest prefix of the arguments it takes (Lightning passes a callback
/// only the keyword arguments its signature names); none fitting is a compile error.
template <Hook H, std::size_t N, class C, class... Args>
FABRIC_ALWAYS_INLINE void call_with_prefix(C& callback, std::tuple<Args&...> args) {
  if constexpr (invocable_with_first<H, C, std::tuple<Args&...>>(std::make_index_sequence<N>{})) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { H::invoke(callback, std::get<I>(args)...); }
    (std::make_index_sequence<N>{});
  } else if constexpr (N > 0) {
    call_with_prefix<H, N - 1>(callback, args);
  } else {
    static_assert(N > 0,
                  "fabric: a callback declares this hook but its signature cannot take the arguments "
                  "given to call(); change that member function's parameters to accept them");
  }
}

template <Hook H, class C, class... Args>
FABRIC_ALWAYS_INLINE void call_one(C& callback, Args&... args) {
  if constexpr (H::template declared_by<C>()) {
    call_with_prefix<H, sizeof...(Args)>(callback, std::tuple<Args&...>(args...));
  }
}

/// Calls hook H on every callback of the tuple that declares it, in order.
template <Hook H, class... Callbacks, class... Args>
FABRIC_ALWAYS_INLINE void dispatch(std::tuple<Callbacks...>& callbacks, Args&... args) {
  std::apply([&](auto&... callback) { (call_one<H>(callback, args...), ...); }, callbacks);
}

}  // namespace detail
}  // namespace fabric
