#pragma once
// The Accelerator concept: everything Fabric asks of an accelerator policy, and the check that names
// what a policy lacks.

#include "fabric/core/concepts.hpp"

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>

#include <concepts>
#include <string_view>

namespace fabric {
namespace detail {

/// The accelerator chooses among several device types at run time (fabric::Auto): `device_types`.
template <class A>
concept chooses_device_type = requires {
  { *A::device_types.begin() } -> std::convertible_to<c10::DeviceType>;
};
/// The accelerator runs on one device type: `device_type`.
template <class A>
concept has_device_type = requires {
  { A::device_type } -> std::convertible_to<c10::DeviceType>;
};
/// The accelerator says which device types it may run on: one `device_type`, or `device_types`
/// (fabric::Auto, which chooses at run time); precisions check their combinations against them.
template <class A>
concept names_device_types = has_device_type<A> || chooses_device_type<A>;
/// The accelerator can tell whether it is usable on this machine (before any device is touched).
template <class A>
concept reports_availability = requires {
  { A::is_available() } -> std::same_as<bool>;
  { A::device_count() } -> std::convertible_to<int>;
};
/// The accelerator checks its settings and the number of devices per node before processes start.
template <class A>
concept checks_devices = requires(const A& a, int devices) {
  a.check(devices);
};
/// The accelerator picks and prepares the device of a local rank.
template <class A>
concept selects_device = requires(const A& a, int local_rank, int devices) {
  { a.select_device(local_rank, devices) } -> std::same_as<c10::Device>;
};
/// The accelerator releases what it holds when the Fabric goes away.
template <class A>
concept tears_down = requires(A& a) {
  a.teardown();
};

}  // namespace detail

/// An accelerator policy: an object (its settings) that tells whether it is available, checks the
/// requested devices, picks and prepares the device of each process, and tears down.
///
///     struct MyAccelerator {
///       using category = fabric::accelerator_tag;
///       static constexpr std::string_view name = "mine";
///       static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
///       static bool is_available() { return true; }
///       static int device_count() { return 1; }
///       void check(int devices) const;
///       c10::Device select_device(int local_rank, int devices) const;
///       void teardown() {}
///     };
template <class A>
concept Accelerator = PolicyOf<A, accelerator_tag> && std::move_constructible<A> && detail::names_device_types<A> &&
    detail::reports_availability<A> && detail::checks_devices<A> && detail::selects_device<A> && detail::tears_down<A>;

namespace detail {

/// Stands for any accelerator where a concept checks another policy's compile-time combination check
/// (declared only: it is never called).
struct AcceleratorArchetype {
  using category = accelerator_tag;
  static constexpr std::string_view name = "archetype";
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  static bool is_available();
  static int device_count();
  void check(int devices) const;
  c10::Device select_device(int local_rank, int devices) const;
  void teardown();
};
static_assert(Accelerator<AcceleratorArchetype>);

/// Fails with one message naming the first member an accelerator policy lacks; true when it has all.
template <class A>
consteval bool check_accelerator() {
  if constexpr (!std::move_constructible<A>) {
    static_assert(dependent_false_v<A>, "fabric: an Accelerator must be move constructible; it holds only settings");
  } else if constexpr (!names_device_types<A>) {
    static_assert(dependent_false_v<A>,
                  "fabric: an Accelerator needs `static constexpr c10::DeviceType device_type` (or an array "
                  "`device_types` for one that chooses at run time); add the device type it runs on");
  } else if constexpr (!reports_availability<A>) {
    static_assert(dependent_false_v<A>,
                  "fabric: an Accelerator needs `static bool is_available()` and `static int device_count()`; add "
                  "them (see fabric::CPU)");
  } else if constexpr (!checks_devices<A>) {
    static_assert(dependent_false_v<A>,
                  "fabric: an Accelerator needs `void check(int devices) const`, which validates its settings and "
                  "the devices per node before any process starts; add it (see fabric::CPU)");
  } else if constexpr (!selects_device<A>) {
    static_assert(dependent_false_v<A>,
                  "fabric: an Accelerator needs `c10::Device select_device(int local_rank, int devices) const`, "
                  "which picks and prepares the device of a process; add it (see fabric::CPU)");
  } else if constexpr (!tears_down<A>) {
    static_assert(dependent_false_v<A>,
                  "fabric: an Accelerator needs `void teardown()`, called when the Fabric is destroyed; add an "
                  "empty one if there is nothing to release");
  }
  return Accelerator<A>;
}

/// True when the accelerator may run on the device type: one of `A::device_types` for an
/// accelerator that chooses at run time (fabric::Auto), else its one `A::device_type`.
template <class A>
constexpr bool may_run_on(c10::DeviceType type) noexcept {
  if constexpr (chooses_device_type<A>) {
    for (const auto t : A::device_types) {
      if (t == type) return true;
    }
    return false;
  } else {
    return A::device_type == type;
  }
}

}  // namespace detail
}  // namespace fabric
