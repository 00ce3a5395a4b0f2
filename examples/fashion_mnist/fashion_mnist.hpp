#pragma once
// fashion_mnist::FashionMNIST: the Fashion-MNIST data set as a LibTorch map-style dataset, read
// from the gzipped IDX files of Debian's dataset-fashion-mnist package; fashion_mnist::Net: the
// example's CNN.

#include <fabric/fabric.hpp>

#include <torch/data/datasets/base.h>
#include <torch/data/example.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <zlib.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace fashion_mnist {

/// Where Debian's dataset-fashion-mnist package installs the four .gz files.
inline constexpr std::string_view default_data_dir = "/usr/share/datasets/fashion-mnist";

/// The ten class names, indexed by label.
inline constexpr std::array<std::string_view, 10> class_names = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};

namespace detail {

inline constexpr std::uint32_t images_magic = 0x00000803;  // unsigned bytes, 3 dimensions
inline constexpr std::uint32_t labels_magic = 0x00000801;  // unsigned bytes, 1 dimension
inline constexpr std::int64_t side = 28;
inline constexpr std::int64_t classes = 10;
// A decompressed file larger than this cannot be Fashion-MNIST (the training images are 47 MB).
inline constexpr std::size_t max_decompressed = std::size_t{1} << 30;

/// Decompresses a whole gzip file into memory, refusing files that are missing, not gzip,
/// truncated or corrupt (zlib checks the CRC and length in the gzip trailer at the end).
inline std::vector<unsigned char> read_gzip(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    fabric::detail::raise(
        "FashionMNIST: expected the file {}, found {}; install Debian's dataset-fashion-mnist package "
        "(apt install dataset-fashion-mnist), or point the data directory (FashionMNIST::Options::root, --data-dir "
        "of the example) at the folder that holds the four *-ubyte.gz files",
        path.string(), std::filesystem::exists(path, ec) ? "something that is not a regular file" : "no such file");
  }
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    fabric::detail::raise(
        "FashionMNIST: expected a readable file at {}, found one that cannot be opened ({}); "
        "check its permissions",
        path.string(), std::strerror(errno));
  }
  struct Closer {
    gzFile f;
    ~Closer() { gzclose(f); }
  } closer{file};
  gzbuffer(file, 1 << 17);

  std::vector<unsigned char> out;
  std::array<unsigned char, 1 << 16> chunk{};
  for (;;) {
    const int n = gzread(file, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int code = Z_OK;
      const char* message = gzerror(file, &code);
      fabric::detail::raise(
          "FashionMNIST: expected a complete gzip stream in {}, found a corrupt one after {} decompressed bytes "
          "(zlib: {}); reinstall the dataset-fashion-mnist package or download the file again",
          path.string(), out.size(), message != nullptr ? message : "unknown error");
    }
    if (n == 0) break;
    // NOTE: zlib reads a file without a gzip header "transparently", as it is; refuse that.
    if (out.empty() && gzdirect(file) != 0) {
      fabric::detail::raise(
          "FashionMNIST: expected a gzip-compressed IDX file at {}, found data that is not gzip (no gzip header); "
          "pass the original *-ubyte.gz file, or gzip an uncompressed IDX file first",
          path.string());
    }
    out.insert(out.end(), chunk.begin(), chunk.begin() + n);
    if (out.size() > max_decompressed) {
      fabric::detail::raise(
          "FashionMNIST: expected at most {} decompressed bytes in {}, found more; this is not a "
          "Fashion-MNIST file, pass the original *-ubyte.gz file",
          max_decompressed, path.string());
    }
  }
  // NOTE: gzread reports a stream that ends early (no trailer) as end of file, with the error set.
  int code = Z_OK;
  const char* message = gzerror(file, &code);
  if (code != Z_OK) {
    fabric::detail::raise(
        "FashionMNIST: expected a complete gzip stream in {}, found a truncated or corrupt one after {} "
        "decompressed bytes (zlib: {}); reinstall the dataset-fashion-mnist package or download the file again",
        path.string(), out.size(), message != nullptr ? message : "unknown error");
  }
  if (out.empty()) {
    fabric::detail::raise(
        "FashionMNIST: expected an IDX file in {}, found an empty file; pass the original "
        "*-ubyte.gz file",
        path.string());
  }
  return out;
}

inline std::uint32_t read_be32(const std::vector<unsigned char>& bytes, std::size_t offset) {
  return (std::uint32_t{bytes[offset]} << 24) | (std::uint32_t{bytes[offset + 1]} << 16) |
         (std::uint32_t{bytes[offset + 2]} << 8) | std::uint32_t{bytes[offset + 3]};
}

/// Parses an IDX header (magic number, then one big-endian 32-bit size per dimension), checks that
/// the payload has exactly the announced size, and returns the sizes.
inline std::vector<std::int64_t> parse_idx(const std::vector<unsigned char>& bytes, std::uint32_t magic,
                                           std::string_view what, const std::filesystem::path& path) {
  const std::size_t rank = magic & 0xFF;
  const std::size_t header = 4 * (1 + rank);
  if (bytes.size() < 4) {
    fabric::detail::raise(
        "FashionMNIST: expected an IDX {} file in {}, found only {} bytes; pass the original "
        "*-ubyte.gz file",
        what, path.string(), bytes.size());
  }
  const std::uint32_t found = read_be32(bytes, 0);
  if (found != magic) {
    fabric::detail::raise(
        "FashionMNIST: expected the IDX magic number 0x{:08x} of a {} file in {}, found 0x{:08x}; check that the "
        "file holds {} (images and labels files may be swapped) and is not corrupt",
        magic, what, path.string(), found, what);
  }
  if (bytes.size() < header) {
    fabric::detail::raise(
        "FashionMNIST: expected a {}-byte IDX header in {}, found only {} bytes; the file is "
        "truncated, pass the original *-ubyte.gz file",
        header, path.string(), bytes.size());
  }
  std::vector<std::int64_t> dims;
  std::size_t payload = 1;
  for (std::size_t i = 0; i < rank; ++i) {
    dims.push_back(read_be32(bytes, 4 * (1 + i)));
    payload *= static_cast<std::size_t>(dims.back());
    if (payload > max_decompressed) {
      fabric::detail::raise(
          "FashionMNIST: expected IDX sizes of at most {} bytes in {}, found a header announcing "
          "more; the file is corrupt, pass the original *-ubyte.gz file",
          max_decompressed, path.string());
    }
  }
  if (bytes.size() - header != payload) {
    fabric::detail::raise(
        "FashionMNIST: expected {} bytes of {} after the header of {} (as its sizes announce), found {}; the file "
        "is {}, pass the original *-ubyte.gz file",
        payload, what, path.string(), bytes.size() - header,
        bytes.size() - header < payload ? "truncated" : "longer than its header says");
  }
  return dims;
}

}  // namespace detail

/// Fashion-MNIST as a map-style dataset: `get(i)` returns a float image of shape [1, 28, 28],
/// normalised with the data set's mean and standard deviation, and its int64 label in [0, 10).
///
///     fashion_mnist::FashionMNIST train({.split = fashion_mnist::FashionMNIST::Split::train, .subset = 3000});
///     auto loader = fabric.dataloader(train.map(torch::data::transforms::Stack<>()), {.batch_size = 64});
class FashionMNIST : public torch::data::datasets::Dataset<FashionMNIST> {
 public:
  /// Which half of the data set to read: 60000 training or 10000 test samples.
  enum class Split { train, test };

  /// Settings of the dataset.
  struct Options {
    /// The directory holding train-images-idx3-ubyte.gz and its three siblings.
    std::filesystem::path root = std::filesystem::path(default_data_dir);
    /// The split to read.
    Split split = Split::train;
    /// Keep only the first N samples (all when unset).
    std::optional<std::size_t> subset{};
  };

  /// The mean of the training pixels scaled to [0, 1].
  static constexpr double pixel_mean = 0.2860;
  /// The standard deviation of the training pixels scaled to [0, 1].
  static constexpr double pixel_std = 0.3530;
  /// The number of classes.
  static constexpr std::int64_t num_classes = detail::classes;

  /// Reads and checks the split's two files; throws fabric::Error on any problem.
  explicit FashionMNIST(Options options) : options_(std::move(options)) {
    const std::string prefix = options_.split == Split::train ? "train" : "t10k";
    const auto images_path = options_.root / (prefix + "-images-idx3-ubyte.gz");
    const auto labels_path = options_.root / (prefix + "-labels-idx1-ubyte.gz");
    const auto image_bytes = detail::read_gzip(images_path);
    const auto image_dims = detail::parse_idx(image_bytes, detail::images_magic, "images", images_path);
    if (image_dims[1] != detail::side || image_dims[2] != detail::side) {
      fabric::detail::raise(
          "FashionMNIST: expected {}x{} images in {}, found {}x{}; pass a Fashion-MNIST images "
          "file",
          detail::side, detail::side, images_path.string(), image_dims[1], image_dims[2]);
    }
    const auto label_bytes = detail::read_gzip(labels_path);
    const auto label_dims = detail::parse_idx(label_bytes, detail::labels_magic, "labels", labels_path);
    const std::int64_t count = image_dims[0];
    if (label_dims[0] != count) {
      fabric::detail::raise(
          "FashionMNIST: expected as many labels as images, found {} images in {} and {} labels in {}; pass the "
          "images and labels files of the same split",
          count, images_path.string(), label_dims[0], labels_path.string());
    }
    if (count == 0) {
      fabric::detail::raise("FashionMNIST: expected samples in {}, found none; pass the original *-ubyte.gz files",
                            images_path.string());
    }
    std::int64_t keep = count;
    if (options_.subset) {
      if (*options_.subset == 0 || *options_.subset > static_cast<std::size_t>(count)) {
        fabric::detail::raise(
            "FashionMNIST: expected a subset of 1 to {} samples for the {} split, found {}; pass "
            "a subset size in that range, or none for all samples",
            count, prefix, *options_.subset);
      }
      keep = static_cast<std::int64_t>(*options_.subset);
    }

    const unsigned char* labels = label_bytes.data() + 8;
    for (std::int64_t i = 0; i < count; ++i) {
      if (labels[i] >= detail::classes) {
        fabric::detail::raise(
            "FashionMNIST: expected labels in [0, {}) in {}, found {} at index {}; the file is "
            "corrupt, pass the original *-ubyte.gz file",
            detail::classes, labels_path.string(), static_cast<int>(labels[i]), i);
      }
    }
    // NOTE: from_blob does not copy; clone/to() below make tensors that own their memory.
    images_ = torch::from_blob(const_cast<unsigned char*>(image_bytes.data()) + 16,
                               {keep, 1, detail::side, detail::side}, torch::kUInt8)
                  .to(torch::kFloat32)
                  .div_(255.0)
                  .sub_(pixel_mean)
                  .div_(pixel_std);
    targets_ = torch::from_blob(const_cast<unsigned char*>(labels), {keep}, torch::kUInt8).to(torch::kInt64);
  }

  /// Returns sample `index`: the image [1, 28, 28] float and its label (a 0-dim int64 tensor).
  torch::data::Example<> get(std::size_t index) override {
    if (index >= static_cast<std::size_t>(images_.size(0))) {
      fabric::detail::raise("FashionMNIST: expected an index below {}, found {}", images_.size(0), index);
    }
    const auto i = static_cast<std::int64_t>(index);
    return {images_[i], targets_[i]};
  }
  /// Returns the number of samples.
  c10::optional<std::size_t> size() const override { return static_cast<std::size_t>(images_.size(0)); }

  /// Returns all images, [N, 1, 28, 28] float.
  const torch::Tensor& images() const noexcept { return images_; }
  /// Returns all labels, [N] int64.
  const torch::Tensor& targets() const noexcept { return targets_; }
  /// Returns the split this dataset holds.
  Split split() const noexcept { return options_.split; }

 private:
  Options options_;
  torch::Tensor images_;
  torch::Tensor targets_;
};

/// The model: two convolution blocks (conv, batch norm, ReLU, 2x2 max-pool), dropout, a linear head.
struct NetImpl : torch::nn::Module {
  NetImpl()
      : features(register_module(
            "features",
            torch::nn::Sequential(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1).bias(false)),
                                  torch::nn::BatchNorm2d(32), torch::nn::ReLU(), torch::nn::MaxPool2d(2),
                                  torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1).bias(false)),
                                  torch::nn::BatchNorm2d(64), torch::nn::ReLU(), torch::nn::MaxPool2d(2)))),
        dropout(register_module("dropout", torch::nn::Dropout(0.25))),
        head(register_module("head", torch::nn::Linear(64 * 7 * 7, detail::classes))) {}

  /// Returns the logits [N, 10] of images [N, 1, 28, 28].
  torch::Tensor forward(const torch::Tensor& x) { return head(dropout(features->forward(x).flatten(1))); }

  torch::nn::Sequential features;
  torch::nn::Dropout dropout;
  torch::nn::Linear head;
};
TORCH_MODULE(Net);

}  // namespace fashion_mnist
