#pragma once
// GPT-2 in LibTorch: token and learned position embeddings, pre-LayerNorm transformer blocks with
// causal self-attention and a 4x tanh-GELU MLP, a final LayerNorm and a head tied to the token
// embedding. The default Config is GPT-2 small (124,475,904 parameters with the vocabulary padded to
// 50304); the model is written like nanoGPT's, so the parameter names and the initialisation match.
// Its Linear layers are fabric::nn::Linear (the bias inside the GEMM for [B, T, C] inputs, which
// torch::nn::Linear does not do; under autocast float32 weight gradients from the GEMM), its LayerNorms
// fabric::nn::LayerNorm (fused CUDA kernels) and its loss is fabric::nn::cross_entropy (no float32 logits).
//
//     gpt2::GPT model(gpt2::Config{});                  // GPT-2 small
//     gpt2::GPT tiny(gpt2::Config::tiny());             // a few thousand parameters, for tests
//     at::Tensor logits = model(tokens);                // tokens [B, T] int64 -> logits [B, T, vocab]

#include <torch/torch.h>
#include <fabric/fabric.hpp>  // fabric::nn::Linear, LayerNorm and cross_entropy (single_include has them too)

// NOTE: LibTorch 2.0 added scaled_dot_product_attention (flash and memory-efficient kernels on the
// GPU); 1.13 gets the same attention spelled out with a causal mask.
#if __has_include(<ATen/ops/scaled_dot_product_attention.h>)
#include <ATen/ops/scaled_dot_product_attention.h>
#define GPT2_HAS_SDPA 1
#else
#define GPT2_HAS_SDPA 0
#endif

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace gpt2 {

/// The shape of a GPT-2 model; the defaults are GPT-2 small.
struct Config {
  std::int64_t n_layer = 12;        ///< transformer blocks
  std::int64_t n_head = 12;         ///< attention heads per block
  std::int64_t n_embd = 768;        ///< width of the residual stream
  std::int64_t block_size = 1024;   ///< the longest sequence (rows of the position embedding)
  std::int64_t vocab_size = 50304;  ///< GPT-2's 50257 tokens padded to a multiple of 64

  /// Returns a tiny model for tests and CPU smoke runs (2 layers, 2 heads, width 64, 32 positions,
  /// 256 tokens).
  static Config tiny() { return {.n_layer = 2, .n_head = 2, .n_embd = 64, .block_size = 32, .vocab_size = 256}; }

  /// Throws std::invalid_argument unless every size is positive and the width splits into the heads.
  void check() const {
    if (n_layer < 1 || n_head < 1 || n_embd < 1 || block_size < 1 || vocab_size < 1) {
      throw std::invalid_argument("gpt2::Config: expected positive sizes");
    }
    if (n_embd % n_head != 0) {
      throw std::invalid_argument("gpt2::Config: expected n_embd divisible by n_head, found " + std::to_string(n_embd) +
                                  " and " + std::to_string(n_head));
    }
  }
};

/// Causal multi-head self-attention: one projection to queries, keys and values, one back.
class CausalSelfAttentionImpl : public torch::nn::Module {
 public:
  explicit CausalSelfAttentionImpl(const Config& config)
      : n_head_(config.n_head),
        c_attn(register_module("c_attn", fabric::nn::Linear(config.n_embd, 3 * config.n_embd))),
        c_proj(register_module("c_proj", fabric::nn::Linear(config.n_embd, config.n_embd))) {}

  /// Returns the attention output of x [B, T, C]; position t attends to positions <= t only.
  at::Tensor forward(const at::Tensor& x) {
    const auto B = x.size(0), T = x.size(1), C = x.size(2);
    const auto head = C / n_head_;
    const auto qkv = c_attn(x).split(C, /*dim=*/2);
    const auto heads = [&](const at::Tensor& t) { return t.view({B, T, n_head_, head}).transpose(1, 2); };
    const at::Tensor q = heads(qkv[0]), k = heads(qkv[1]), v = heads(qkv[2]);  // [B, nh, T, hs]
#if GPT2_HAS_SDPA
    at::Tensor y = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true);
#else
    const at::Tensor future = torch::ones({T, T}, x.options().dtype(torch::kBool)).triu(1);
    at::Tensor att = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(head)));
    att = att.masked_fill(future, -std::numeric_limits<double>::infinity()).softmax(-1);
    at::Tensor y = torch::matmul(att, v);
#endif
    return c_proj(y.transpose(1, 2).contiguous().view({B, T, C}));
  }

 private:
  std::int64_t n_head_;

 public:
  fabric::nn::Linear c_attn, c_proj;
};
TORCH_MODULE(CausalSelfAttention);

/// The feed-forward part of a block: width -> 4 x width, tanh-GELU, back to width.
class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const Config& config)
      : c_fc(register_module("c_fc", fabric::nn::Linear(config.n_embd, 4 * config.n_embd))),
        c_proj(register_module("c_proj", fabric::nn::Linear(4 * config.n_embd, config.n_embd))) {}

  /// Returns the MLP of x [..., C].
  at::Tensor forward(const at::Tensor& x) { return c_proj(torch::gelu(c_fc(x), "tanh")); }

  fabric::nn::Linear c_fc, c_proj;
};
TORCH_MODULE(MLP);

/// A LayerNorm over n features whose output feeds a Linear: fabric's fused kernels on CUDA, and under
/// autocast its output in the autocast dtype, which the Linear would cast it to anyway.
inline fabric::nn::LayerNorm layer_norm(std::int64_t n) {
  fabric::nn::LayerNorm ln(torch::nn::LayerNormOptions({n}));
  ln->autocast_output(true);
  return ln;
}

/// A pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)).
class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const Config& config)
      : ln_1(register_module("ln_1", layer_norm(config.n_embd))),
        attn(register_module("attn", CausalSelfAttention(config))),
        ln_2(register_module("ln_2", layer_norm(config.n_embd))),
        mlp(register_module("mlp", MLP(config))) {}

  /// Returns the block's output for x [B, T, C].
  at::Tensor forward(at::Tensor x) {
    x = x + attn(ln_1(x));
    return x + mlp(ln_2(x));
  }

  fabric::nn::LayerNorm ln_1;
  CausalSelfAttention attn;
  fabric::nn::LayerNorm ln_2;
  MLP mlp;
};
// NOTE: a fabric unit (in place of TORCH_MODULE): FSDP and activation checkpointing wrap its forward.
FABRIC_UNIT(Block);

/// GPT-2: embeddings, n_layer blocks, a final LayerNorm, and logits through the token embedding.
///
/// The output head is the token embedding's weight itself (`at::linear(x, wte->weight)`), so the
/// tied matrix is one Parameter, counted once by parameters() and updated once by an optimizer.
class GPTImpl : public torch::nn::Module {
 public:
  /// Builds the model with GPT-2's initialisation: weights of linear layers and embeddings from
  /// N(0, 0.02), the residual projections (`c_proj`) from N(0, 0.02 / sqrt(2 n_layer)), biases zero,
  /// LayerNorms one and zero. Draws from LibTorch's default generator (seed it first).
  explicit GPTImpl(const Config& config)
      : config_((config.check(), config)),
        wte(register_module("wte", torch::nn::Embedding(config.vocab_size, config.n_embd))),
        wpe(register_module("wpe", torch::nn::Embedding(config.block_size, config.n_embd))),
        h(register_module("h", torch::nn::ModuleList())),
        ln_f(register_module("ln_f", layer_norm(config.n_embd))) {
    for (std::int64_t i = 0; i < config.n_layer; ++i) {
      blocks_.emplace_back(config);
      h->push_back(blocks_.back());
    }
    init_weights();
  }

  /// Returns the logits [B, T, vocab_size] of the tokens idx [B, T] (int64, T <= block_size).
  at::Tensor forward(const at::Tensor& idx) {
    const auto T = idx.size(1);
    if (T > config_.block_size) {
      throw std::invalid_argument("gpt2::GPT: expected at most " + std::to_string(config_.block_size) +
                                  " tokens per sequence, found " + std::to_string(T));
    }
    const at::Tensor pos = torch::arange(T, idx.options().dtype(torch::kLong));
    at::Tensor x = wte(idx) + wpe(pos);
    for (auto& block : blocks_) x = block(x);
    return at::linear(ln_f(x), wte->weight);  // the tied head
  }

  /// Returns the configuration the model was built from.
  const Config& config() const noexcept { return config_; }

  /// Returns the number of parameters (the tied embedding counted once).
  std::int64_t num_parameters() const {
    std::int64_t n = 0;
    for (const auto& p : parameters()) n += p.numel();
    return n;
  }

 private:
  void init_weights() {
    torch::NoGradGuard no_grad;
    const double residual_std = 0.02 / std::sqrt(2.0 * static_cast<double>(config_.n_layer));
    for (auto& item : named_parameters()) {
      const std::string& name = item.key();
      at::Tensor& p = item.value();
      const auto ends_with = [&](const std::string& suffix) {
        return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
      };
      if (ends_with("c_proj.weight")) {
        p.normal_(0.0, residual_std);
      } else if (p.dim() >= 2) {
        p.normal_(0.0, 0.02);
      } else if (ends_with(".bias")) {
        p.zero_();
      }
    }
  }

  Config config_;

 public:
  torch::nn::Embedding wte, wpe;
  torch::nn::ModuleList h;
  fabric::nn::LayerNorm ln_f;

 private:
  std::vector<Block> blocks_;  // the blocks of h, typed
};
TORCH_MODULE(GPT);

/// Returns the mean cross-entropy of logits [B, T, V] against targets [B, T] over all positions, in
/// float32 from logits of any floating dtype without a float32 copy of them (fabric::nn::cross_entropy).
inline at::Tensor loss(const at::Tensor& logits, const at::Tensor& targets,
                       const fabric::nn::ChunkOptions& chunks = {}) {
  return fabric::nn::cross_entropy(logits.view({-1, logits.size(-1)}), targets.reshape({-1}), {}, chunks);
}

/// Returns the same loss the float32 way: logits cast to float32, then LibTorch's cross-entropy (the path
/// of a plain LibTorch loop; faster than gpt2::loss on an H200, which saves the float32 copy's memory).
inline at::Tensor float32_loss(const at::Tensor& logits, const at::Tensor& targets) {
  return torch::nn::functional::cross_entropy(logits.to(torch::kFloat).view({-1, logits.size(-1)}),
                                              targets.reshape({-1}));
}

}  // namespace gpt2
