// Tests of the Fashion-MNIST dataset of examples/fashion_mnist: the real files of Debian's
// dataset-fashion-mnist package, the subset option, and every way a file can be wrong.

#include "fashion_mnist/fashion_mnist.hpp"

#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <zlib.h>
#include "unit/temp_dir.hpp"

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using Catch::Matchers::ContainsSubstring;
using fashion_mnist::FashionMNIST;

// A fresh directory per test, removed after.
struct TempDir : fabric_test::TempDir {
  TempDir() : fabric_test::TempDir("fabric-fashion-mnist") {}
};

std::vector<unsigned char> idx(std::uint32_t magic, const std::vector<std::uint32_t>& dims,
                               const std::vector<unsigned char>& payload) {
  std::vector<unsigned char> out;
  const auto put = [&](std::uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<unsigned char>(v >> shift));
  };
  put(magic);
  for (auto d : dims) put(d);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

void write_gzip(const fs::path& path, const std::vector<unsigned char>& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  REQUIRE(file != nullptr);
  REQUIRE(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(file) == Z_OK);
}

void write_raw(const fs::path& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

std::vector<unsigned char> read_raw(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// n images of 28x28 whose pixels are all `i * 50` for image i, and labels i % 10.
std::vector<unsigned char> images_idx(std::uint32_t n, std::uint32_t side = 28) {
  std::vector<unsigned char> pixels;
  for (std::uint32_t i = 0; i < n; ++i) pixels.insert(pixels.end(), side * side, static_cast<unsigned char>(i * 50));
  return idx(0x803, {n, side, side}, pixels);
}
std::vector<unsigned char> labels_idx(std::uint32_t n) {
  std::vector<unsigned char> labels;
  for (std::uint32_t i = 0; i < n; ++i) labels.push_back(static_cast<unsigned char>(i % 10));
  return idx(0x801, {n}, labels);
}

/// Writes a valid test split of n samples into dir.
void write_test_split(const fs::path& dir, std::uint32_t n) {
  write_gzip(dir / "t10k-images-idx3-ubyte.gz", images_idx(n));
  write_gzip(dir / "t10k-labels-idx1-ubyte.gz", labels_idx(n));
}

FashionMNIST load_test(const fs::path& dir) { return FashionMNIST({.root = dir, .split = FashionMNIST::Split::test}); }

const fs::path real_dir{fashion_mnist::default_data_dir};

}  // namespace

TEST_CASE("FashionMNIST reads the real data set", "[example][FashionMNIST]") {
  if (!fs::exists(real_dir / "train-images-idx3-ubyte.gz")) SKIP("dataset-fashion-mnist is not installed");
  FashionMNIST train({.split = FashionMNIST::Split::train});
  FashionMNIST test({.split = FashionMNIST::Split::test});
  REQUIRE(train.size() == 60000u);
  REQUIRE(test.size() == 10000u);

  CHECK(train.images().sizes() == torch::IntArrayRef({60000, 1, 28, 28}));
  CHECK(train.images().dtype() == torch::kFloat32);
  CHECK(train.targets().sizes() == torch::IntArrayRef({60000}));
  CHECK(train.targets().dtype() == torch::kInt64);
  CHECK(test.images().sizes() == torch::IntArrayRef({10000, 1, 28, 28}));

  // Labels cover exactly 0..9, 6000 training and 1000 test samples each (the data set is balanced).
  const auto train_counts = torch::bincount(train.targets());
  const auto test_counts = torch::bincount(test.targets());
  REQUIRE(train_counts.numel() == 10);
  REQUIRE(test_counts.numel() == 10);
  CHECK(train_counts.eq(6000).all().item<bool>());
  CHECK(test_counts.eq(1000).all().item<bool>());
  CHECK(train.targets().min().item<std::int64_t>() == 0);
  CHECK(train.targets().max().item<std::int64_t>() == 9);

  // Normalised with the training set's own statistics: mean about 0, standard deviation about 1.
  CHECK(std::abs(train.images().mean().item<double>()) < 0.01);
  CHECK(std::abs(train.images().std().item<double>() - 1.0) < 0.01);
  const double lowest = (0.0 - FashionMNIST::pixel_mean) / FashionMNIST::pixel_std;
  const double highest = (1.0 - FashionMNIST::pixel_mean) / FashionMNIST::pixel_std;
  CHECK(train.images().min().item<double>() >= lowest - 1e-5);
  CHECK(train.images().max().item<double>() <= highest + 1e-5);

  const auto example = train.get(59999);
  CHECK(example.data.sizes() == torch::IntArrayRef({1, 28, 28}));
  CHECK(example.target.dim() == 0);
  CHECK(example.target.dtype() == torch::kInt64);
  CHECK_THROWS_WITH(train.get(60000), ContainsSubstring("expected an index below 60000"));
}

TEST_CASE("FashionMNIST keeps the first N samples with subset", "[example][FashionMNIST]") {
  if (!fs::exists(real_dir / "t10k-images-idx3-ubyte.gz")) SKIP("dataset-fashion-mnist is not installed");
  FashionMNIST all({.split = FashionMNIST::Split::test});
  FashionMNIST some({.split = FashionMNIST::Split::test, .subset = 250});
  REQUIRE(some.size() == 250u);
  CHECK(some.images().sizes() == torch::IntArrayRef({250, 1, 28, 28}));
  CHECK(some.targets().sizes() == torch::IntArrayRef({250}));
  CHECK(torch::equal(some.images(), all.images().slice(0, 0, 250)));
  CHECK(torch::equal(some.targets(), all.targets().slice(0, 0, 250)));

  FashionMNIST whole({.split = FashionMNIST::Split::test, .subset = 10000});
  CHECK(whole.size() == 10000u);
  CHECK_THROWS_WITH(FashionMNIST({.split = FashionMNIST::Split::test, .subset = 10001}),
                    ContainsSubstring("expected a subset of 1 to 10000 samples") && ContainsSubstring("found 10001"));
  CHECK_THROWS_AS(FashionMNIST({.split = FashionMNIST::Split::test, .subset = 0}), fabric::Error);
}

TEST_CASE("FashionMNIST batches through a LibTorch loader", "[example][FashionMNIST]") {
  TempDir dir;
  write_test_split(dir.path(), 5);
  auto dataset = load_test(dir.path()).map(torch::data::transforms::Stack<>());
  auto loader = torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(std::move(dataset), 4);
  std::vector<std::int64_t> sizes;
  for (auto& batch : *loader) {
    CHECK(batch.data.size(1) == 1);
    CHECK(batch.data.size(2) == 28);
    sizes.push_back(batch.target.size(0));
  }
  CHECK(sizes == std::vector<std::int64_t>{4, 1});
}

TEST_CASE("FashionMNIST reads and normalises a small valid file", "[example][FashionMNIST]") {
  TempDir dir;
  write_test_split(dir.path(), 5);
  const auto data = load_test(dir.path());
  REQUIRE(data.size() == 5u);
  CHECK(data.targets().equal(torch::tensor({0, 1, 2, 3, 4}, torch::kInt64)));
  // Image 2 has every pixel at 100.
  const double expected = (100.0 / 255.0 - FashionMNIST::pixel_mean) / FashionMNIST::pixel_std;
  CHECK(std::abs(data.images()[2].min().item<double>() - expected) < 1e-5);
  CHECK(std::abs(data.images()[2].max().item<double>() - expected) < 1e-5);
}

TEST_CASE("FashionMNIST rejects missing and damaged files", "[example][FashionMNIST]") {
  TempDir dir;
  const auto images = dir.path() / "t10k-images-idx3-ubyte.gz";
  const auto labels = dir.path() / "t10k-labels-idx1-ubyte.gz";

  SECTION("missing file") {
    CHECK_THROWS_AS(load_test(dir.path()), fabric::Error);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("t10k-images-idx3-ubyte.gz") &&
                                                 ContainsSubstring("no such file") &&
                                                 ContainsSubstring("dataset-fashion-mnist"));
    write_gzip(images, images_idx(3));
    CHECK_THROWS_WITH(load_test(dir.path()),
                      ContainsSubstring("t10k-labels-idx1-ubyte.gz") && ContainsSubstring("no such file"));
  }
  SECTION("a directory where the file should be") {
    fs::create_directories(images);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("not a regular file"));
  }
  SECTION("not gzip") {
    write_raw(images, std::vector<unsigned char>(100, 'x'));
    write_gzip(labels, labels_idx(3));
    CHECK_THROWS_AS(load_test(dir.path()), fabric::Error);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("not gzip"));
  }
  SECTION("an uncompressed IDX file") {
    write_raw(images, images_idx(3));
    write_gzip(labels, labels_idx(3));
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("not gzip"));
  }
  SECTION("empty file") {
    write_raw(images, {});
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("empty file"));
  }
  SECTION("truncated gzip") {
    write_gzip(images, images_idx(20));
    write_gzip(labels, labels_idx(20));
    auto bytes = read_raw(images);
    REQUIRE(bytes.size() > 40);
    bytes.resize(bytes.size() / 2);
    write_raw(images, bytes);
    CHECK_THROWS_AS(load_test(dir.path()), fabric::Error);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("truncated or corrupt"));
  }
  SECTION("gzip without its trailer") {
    write_gzip(images, images_idx(20));
    write_gzip(labels, labels_idx(20));
    auto bytes = read_raw(images);
    bytes.resize(bytes.size() - 4);  // the length field of the trailer
    write_raw(images, bytes);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("truncated or corrupt"));
  }
  SECTION("corrupt gzip (bad checksum)") {
    write_gzip(images, images_idx(20));
    write_gzip(labels, labels_idx(20));
    auto bytes = read_raw(images);
    bytes[bytes.size() - 8] ^= 0xFF;  // the CRC-32 of the trailer
    write_raw(images, bytes);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("corrupt") && ContainsSubstring("zlib"));
  }
  SECTION("wrong magic number") {
    write_gzip(images, labels_idx(3));  // a labels file where the images should be
    write_gzip(labels, labels_idx(3));
    CHECK_THROWS_AS(load_test(dir.path()), fabric::Error);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("expected the IDX magic number 0x00000803") &&
                                                 ContainsSubstring("found 0x00000801"));
  }
  SECTION("wrong magic number in the labels") {
    write_gzip(images, images_idx(3));
    write_gzip(labels, images_idx(3));
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("expected the IDX magic number 0x00000801"));
  }
  SECTION("image and label counts differ") {
    write_gzip(images, images_idx(5));
    write_gzip(labels, labels_idx(4));
    CHECK_THROWS_AS(load_test(dir.path()), fabric::Error);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("expected as many labels as images") &&
                                                 ContainsSubstring("found 5 images") && ContainsSubstring("4 labels"));
  }
  SECTION("wrong image size") {
    write_gzip(images, images_idx(3, 32));
    write_gzip(labels, labels_idx(3));
    CHECK_THROWS_WITH(load_test(dir.path()),
                      ContainsSubstring("expected 28x28 images") && ContainsSubstring("found 32x32"));
  }
  SECTION("payload shorter than the header says") {
    auto bytes = images_idx(3);
    bytes.resize(bytes.size() - 100);
    write_gzip(images, bytes);
    write_gzip(labels, labels_idx(3));
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("truncated") && ContainsSubstring("found 2252"));
  }
  SECTION("payload longer than the header says") {
    auto bytes = labels_idx(3);
    bytes.push_back(0);
    write_gzip(images, images_idx(3));
    write_gzip(labels, bytes);
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("longer than its header says"));
  }
  SECTION("header cut short") {
    write_gzip(images, {0, 0, 8, 3, 0, 0});
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("expected a 16-byte IDX header"));
  }
  SECTION("label out of range") {
    write_gzip(images, images_idx(3));
    write_gzip(labels, idx(0x801, {3}, {0, 1, 10}));
    CHECK_THROWS_WITH(load_test(dir.path()),
                      ContainsSubstring("expected labels in [0, 10)") && ContainsSubstring("found 10 at index 2"));
  }
  SECTION("no samples") {
    write_gzip(images, images_idx(0));
    write_gzip(labels, labels_idx(0));
    CHECK_THROWS_WITH(load_test(dir.path()), ContainsSubstring("found none"));
  }
}
