// Bisects the LibTorch 2.x crash after restoring an optimizer from a checkpoint: each experiment
// runs in a forked child; the parent prints how each one ended.
#include <torch/torch.h>
#include <fabric/fabric.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

struct NetImpl : torch::nn::Module {
  NetImpl()
      : fc(register_module("fc", torch::nn::Linear(8, 16))),
        bn(register_module("bn", torch::nn::BatchNorm1d(16))),
        out(register_module("out", torch::nn::Linear(16, 4))) {}
  torch::Tensor forward(const torch::Tensor& x) { return out(torch::relu(bn(fc(x)))); }
  torch::nn::Linear fc;
  torch::nn::BatchNorm1d bn;
  torch::nn::Linear out;
};
TORCH_MODULE(Net);

struct TNetImpl : torch::nn::Module {
  explicit TNetImpl(std::int64_t hidden = 8)
      : fc(register_module("fc", torch::nn::Linear(4, hidden))),
        bn(register_module("bn", torch::nn::BatchNorm1d(hidden))),
        head(register_module("head", torch::nn::Sequential(torch::nn::Linear(hidden, 3)))),
        scale(register_buffer("scale", torch::ones({3}))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head->forward(torch::relu(bn(fc(x)))) * scale; }
  torch::nn::Linear fc;
  torch::nn::BatchNorm1d bn;
  torch::nn::Sequential head;
  torch::Tensor scale;
};
TORCH_MODULE(TNet);

static void ttrain(TNet& net, torch::optim::Optimizer& opt, int steps) {
  net->train();
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    net->forward(torch::randn({16, 4})).pow(2).mean().backward();
    opt.step();
  }
}

static void train(Net& net, torch::optim::Optimizer& opt, int steps) {
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    net->forward(torch::randn({32, 8})).pow(2).mean().backward();
    opt.step();
  }
}

int main() {
  const std::string path = "/tmp/repro.ckpt";
  std::vector<std::pair<std::string, std::function<void()>>> experiments = {
      {"raise with a std::string argument, caught, 100 times",
       [&] {
         for (int i = 0; i < 100; ++i) {
           try {
             fabric::detail::raise("x {} {}", std::string("abc"), i);
           } catch (const fabric::Error&) {
           }
         }
       }},
      {"StateEntry get<int> of a string, caught",
       [&] {
         fabric::StateEntry e{std::string("run-a")};
         try {
           (void)e.get<int>();
         } catch (const fabric::Error&) {
         }
       }},
      {"the round-trip test body",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         TNet net;
         torch::optim::AdamW adamw(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
         ttrain(net, adamw, 3);
         const auto values = torch::arange(12, torch::kFloat32).reshape({3, 4});
         f.save(path, {{"model", net},
                       {"optimizer", adamw},
                       {"epoch", 7},
                       {"global_step", std::int64_t{1} << 40},
                       {"lr", 0.125},
                       {"ratio", 0.5F},
                       {"best", true},
                       {"done", false},
                       {"name", "run-a"},
                       {"notes", std::string("commas")},
                       {"tensor", values},
                       {"strided", values.t()},
                       {"ints", torch::tensor({1, 2, 3}, torch::kInt64)}});
         TNet net2;
         torch::optim::AdamW adamw2(net2->parameters(), torch::optim::AdamWOptions(0.5));
         ttrain(net2, adamw2, 1);
         fabric::State state{{"model", net2},
                             {"optimizer", adamw2},
                             {"epoch", 0},
                             {"global_step", 0},
                             {"lr", 0.0},
                             {"ratio", 0.0F},
                             {"best", false},
                             {"done", true},
                             {"name", ""},
                             {"notes", ""},
                             {"tensor", torch::zeros({1})},
                             {"strided", torch::zeros({1})},
                             {"ints", torch::zeros({1})}};
         const fabric::State rest = f.load(path, state);
         std::printf("  loaded; epoch %d name %s\n", state.at("epoch").get<int>(),
                     state.at("name").get<std::string>().c_str());
         std::fflush(stdout);
         try {
           (void)state.at("name").get<int>();
         } catch (const fabric::Error&) {
         }
         std::printf("  after get<int>\n");
         std::fflush(stdout);
         ttrain(net, adamw, 2);
         ttrain(net2, adamw2, 2);
         std::printf("  trained\n");
         std::fflush(stdout);
       }},
      {"test net: train, save, train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         TNet a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
         ttrain(a, oa, 3);
         f.save(path, {{"model", a}, {"optimizer", oa}, {"v", torch::arange(12).reshape({3, 4}).t()}});
         ttrain(a, oa, 2);
       }},
      {"test net: save, load model only, train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         TNet a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
         ttrain(a, oa, 3);
         f.save(path, {{"model", a}});
         TNet b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         ttrain(b, ob, 1);
         fabric::State s{{"model", b}};
         f.load(path, s);
         ttrain(b, ob, 2);
       }},
      {"test net: save, load optimizer only, train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         TNet a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
         ttrain(a, oa, 3);
         f.save(path, {{"optimizer", oa}});
         TNet b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         ttrain(b, ob, 1);
         fabric::State s{{"optimizer", ob}};
         f.load(path, s);
         ttrain(b, ob, 2);
       }},
      {"test net: save, load both, train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         TNet a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
         ttrain(a, oa, 3);
         f.save(path, {{"model", a}, {"optimizer", oa}});
         TNet b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         ttrain(b, ob, 1);
         fabric::State s{{"model", b}, {"optimizer", ob}};
         f.load(path, s);
         ttrain(b, ob, 2);
       }},
      {"test net: load into a module object by reference, then forward",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         TNet a;
         f.save(path, {{"model", a}});
         TNet b;
         TNetImpl& object = *b;
         fabric::State s{{"model", object}};
         f.load(path, s, false);
         b->forward(torch::randn({16, 4}));
       }},
      {"fabric save+load model+optimizer, then train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
         train(a, oa, 3);
         f.save(path, {{"model", a}, {"optimizer", oa}});
         Net b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         train(b, ob, 1);
         fabric::State s{{"model", b}, {"optimizer", ob}};
         f.load(path, s);
         train(b, ob, 2);
       }},
      {"fabric load optimizer only, then train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
         train(a, oa, 3);
         f.save(path, {{"optimizer", oa}});
         Net b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         train(b, ob, 1);
         fabric::State s{{"optimizer", ob}};
         f.load(path, s);
         train(b, ob, 2);
       }},
      {"fabric load optimizer without prior state, then train",
       [&] {
         fabric::Fabric<fabric::CPU> f;
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
         train(a, oa, 3);
         f.save(path, {{"optimizer", oa}});
         Net b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         fabric::State s{{"optimizer", ob}};
         f.load(path, s);
         train(b, ob, 2);
       }},
      {"torch::save/torch::load optimizer, then train",
       [&] {
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
         train(a, oa, 3);
         torch::save(oa, path);
         Net b;
         torch::optim::AdamW ob(b->parameters(), torch::optim::AdamWOptions(0.5));
         train(b, ob, 1);
         torch::load(ob, path);
         train(b, ob, 2);
       }},
      {"move the state map out and back, then train",
       [&] {
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
         train(a, oa, 3);
         auto saved = std::move(oa.state());
         oa.state().clear();
         oa.state() = std::move(saved);
         train(a, oa, 2);
       }},
      {"move the state map out, clear, optimizer.load, then train",
       [&] {
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
         train(a, oa, 3);
         torch::serialize::OutputArchive out;
         oa.save(out);
         std::vector<char> bytes;
         out.save_to([&](const void* d, size_t n) {
           bytes.insert(bytes.end(), (const char*)d, (const char*)d + n);
           return n;
         });
         torch::serialize::InputArchive in;
         in.load_from(bytes.data(), bytes.size());
         auto saved = std::move(oa.state());
         oa.state().clear();
         oa.load(in);
         train(a, oa, 2);
       }},
      {"options().serialize(InputArchive) after load, then train",
       [&] {
         Net a;
         torch::optim::AdamW oa(a->parameters(), torch::optim::AdamWOptions(1e-2));
         train(a, oa, 3);
         torch::serialize::OutputArchive out;
         oa.save(out);
         std::vector<char> bytes;
         out.save_to([&](const void* d, size_t n) {
           bytes.insert(bytes.end(), (const char*)d, (const char*)d + n);
           return n;
         });
         torch::serialize::InputArchive in;
         in.load_from(bytes.data(), bytes.size());
         oa.load(in);
         torch::serialize::InputArchive groups;
         in.read("param_groups", groups);
         torch::serialize::InputArchive group;
         groups.read("param_groups/0", group);
         torch::serialize::InputArchive options;
         group.read("options", options);
         oa.param_groups()[0].options().serialize(options);
         train(a, oa, 2);
       }},
  };
  for (auto& [name, fn] : experiments) {
    std::fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
      try {
        fn();
      } catch (const std::exception& e) {
        std::printf("  exception: %s\n", e.what());
        std::fflush(stdout);
        _exit(3);
      }
      _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    std::printf("%-60s %s\n", name.c_str(),
                WIFEXITED(status) ? (WEXITSTATUS(status) == 0 ? "ok" : "exit non-zero")
                                  : ("signal " + std::to_string(WTERMSIG(status))).c_str());
  }
}
