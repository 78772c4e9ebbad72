// `microdit serve`: request bounds, the shared sampling limits, the safetensors shape overflow,
// and the HTTP API on a free port (status codes, PNGs that decode, a full queue, path
// traversal, stopping), first with a stand-in generator, then with a tiny real checkpoint.
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "core/fs.h"
#include "data/image.h"
#include "eval/sampling_limits.h"
#include "io/safetensors.h"
#include "model/microdit.h"
#include "serve/server.h"
#include "test_util.h"
#include "text/encoder.h"

using namespace microdit;
using microdit::test_util::error_of;
using microdit::test_util::TempDir;
using json = nlohmann::json;

namespace {

// Solid pictures whose colour encodes the seed; `gate` holds each picture back until set.
struct FakeGenerator : serve::ImageGenerator {
  std::atomic<bool>* gate = nullptr;
  std::string describe() const override { return "fake"; }
  std::string sample_command(const serve::GenerateRequest& r) const override {
    return "microdit sample --seed " + std::to_string(r.seed);
  }
  void generate(const serve::GenerateRequest& r, const std::function<void(int64_t, const Image&)>& on_image,
                const std::function<bool()>& cancelled) override {
    for (int64_t i = 0; i < r.n; ++i) {
      while (gate && !*gate && !cancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(2));
      if (cancelled()) return;
      on_image(i, Image(8, 6, Rgb{static_cast<uint8_t>((r.seed + i) % 256), 10, 20}));
    }
  }
};

// A server on a free port, served from a thread; stopped and joined on destruction.
struct Running {
  std::unique_ptr<serve::Server> server;
  std::thread thread;
  std::unique_ptr<httplib::Client> client;
  Running(std::unique_ptr<serve::ImageGenerator> gen, const std::string& runs, size_t queue = 4) {
    serve::ServeOptions o;
    o.port = 0;
    o.runs = runs;
    o.limits.queue_size = queue;
    server = std::make_unique<serve::Server>(o, std::move(gen));
    const int port = server->bind();
    thread = std::thread([this] { server->run(); });
    client = std::make_unique<httplib::Client>("127.0.0.1", port);
    client->set_read_timeout(30, 0);
  }
  ~Running() {
    server->stop();
    thread.join();
  }
  json get(const std::string& path, int expect) {
    auto r = client->Get(path.c_str());
    EXPECT_TRUE(r) << path;
    if (!r) return json();
    EXPECT_EQ(r->status, expect) << path << ": " << r->body;
    return json::parse(r->body, nullptr, false);
  }
  json post(const std::string& body, int expect) {
    auto r = client->Post("/api/generate", body, "application/json");
    EXPECT_TRUE(r);
    if (!r) return json();
    EXPECT_EQ(r->status, expect) << body << ": " << r->body;
    return json::parse(r->body, nullptr, false);
  }
  json wait_done(uint64_t id) {
    json j;
    for (int k = 0; k < 200; ++k) {
      j = get("/api/jobs/" + std::to_string(id) + "?after=" + std::to_string(j.is_null() ? 0 : j["done"].get<int>()), 200);
      if (j.is_null() || (j["status"] != "queued" && j["status"] != "running")) break;
    }
    return j;
  }
};

Image decode_png(const std::string& bytes, const std::string& dir) {
  const std::string p = dir + "/decoded.png";
  std::ofstream(p, std::ios::binary) << bytes;
  return read_png(p);
}

}  // namespace

TEST(ServeLimits, SharedSamplingBounds) {
  EXPECT_EQ(error_of([] { check_sampling_values(4, 30, 4.0, 0); }), "");
  EXPECT_NE(error_of([] { check_sampling_values(4, 30, NAN, 0); }).find("guidance (cfg)"), std::string::npos);
  EXPECT_NE(error_of([] { check_sampling_values(4, 30, -1, 0); }).find("guidance"), std::string::npos);
  EXPECT_NE(error_of([] { check_sampling_values(100000000, 30, 4, 0); }).find("images per prompt"), std::string::npos);
  EXPECT_NE(error_of([] { check_sampling_values(4, 0, 4, 0); }).find("steps"), std::string::npos);
  EXPECT_NE(error_of([] { check_sampling_values(4, 30, 4, uint64_t{1} << 60); }).find("seed"), std::string::npos);
  EXPECT_NE(error_of([] { check_prompts(std::vector<std::string>(100, "x"), 64); }).find("at most 1024 images"),
            std::string::npos);
  EXPECT_NE(error_of([] { check_prompts({std::string(5000, 'x')}, 1); }).find("at most 2000 bytes"), std::string::npos);
}

TEST(ServeLimits, SafetensorsShapeOverflowIsNamed) {
  TempDir d;
  const std::string path = d.path + "/overflow.safetensors";
  const std::string header =
      R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,0]}})";
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  std::ofstream(path, std::ios::binary) << bytes << header;
  const std::string err = error_of([&] { read_safetensors(path); });
  EXPECT_NE(err.find("overflows"), std::string::npos) << err;
  EXPECT_EQ(err.find("needing 0"), std::string::npos) << err;
  // An element count that fits but whose byte size does not.
  const std::string h2 = R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,0]}})";
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((h2.size() >> (8 * i)) & 0xff);
  std::ofstream(path, std::ios::binary) << bytes << h2;
  EXPECT_NE(error_of([&] { read_safetensors(path); }).find("overflows"), std::string::npos);
}

TEST(ServeRequest, ParsesAndBoundsEveryField) {
  serve::ServeLimits l;
  auto r = serve::parse_generate_request(R"({"prompt":"red heart","n":3,"steps":7,"cfg":2.5,"seed":9})", l);
  EXPECT_EQ(r.prompt, "red heart");
  EXPECT_EQ(r.n, 3);
  EXPECT_EQ(r.steps, 7);
  EXPECT_DOUBLE_EQ(r.cfg, 2.5);
  EXPECT_EQ(r.seed, 9u);
  auto bad = [&](const std::string& body, const std::string& expect) {
    const std::string e = error_of([&] { serve::parse_generate_request(body, l); });
    EXPECT_NE(e.find(expect), std::string::npos) << body << " -> '" << e << "'";
    EXPECT_EQ(e.find('\n'), std::string::npos);
  };
  bad("[1]", "JSON object");
  bad("not json", "JSON object");
  bad(R"({"n":2})", "'prompt' must be a string");
  bad(R"({"prompt":"   "})", "'prompt' is empty");
  bad(R"({"prompt":")" + std::string(1001, 'a') + R"("})", "at most 1000");
  bad(R"({"prompt":"x","n":0})", "'n' must be an integer in [1, 16]");
  bad(R"({"prompt":"x","n":17})", "'n'");
  bad(R"({"prompt":"x","n":2.5})", "'n'");
  bad(R"({"prompt":"x","n":"4"})", "'n'");
  bad(R"({"prompt":"x","steps":201})", "'steps'");
  bad(R"({"prompt":"x","steps":-1})", "'steps'");
  bad(R"({"prompt":"x","cfg":1e308})", "'cfg'");
  bad(R"({"prompt":"x","cfg":-0.5})", "'cfg'");
  bad(R"({"prompt":"x","cfg":"nan"})", "'cfg'");
  bad(R"({"prompt":"x","seed":-1})", "'seed'");
  bad(R"({"prompt":"x","seed":9007199254740992})", "'seed'");
  bad(R"({"prompt":"x","seed":18446744073709551615})", "'seed'");
  bad(R"({"prompt":"x","path":"../../etc/passwd"})", "unknown field 'path'");
  bad(std::string(20000, ' '), "at most 16384");
}

TEST(ServeHttp, GenerateQueueRunsAndTraversal) {
  TempDir d;
  // runs/good: a run with metrics and a sample grid; runs/escape: a link to a folder outside.
  const std::string runs = d.path + "/runs", outside = d.path + "/outside";
  make_dirs(runs + "/good/samples");
  make_dirs(outside);
  std::ofstream(runs + "/good/metrics.jsonl") << R"({"step": 0, "val_loss": 1.2})" "\n"
      R"({"step": 1, "loss": 1.1, "lr": 1.0e-04, "grad_norm": 0.5, "images_per_s": 30.5, "epoch": 0})" "\n"
      "garbage line\n"
      R"({"step": 2, "loss": 0.9, "lr": 2.0e-04, "grad_norm": 0.4, "images_per_s": 31.5, "epoch": 0})" "\n"
      R"({"step": 2, "val_loss": 1.0})" "\n";
  write_png(runs + "/good/samples/step-0000002.png", Image(4, 4, kBlack));
  std::ofstream(runs + "/good/samples/step-0000002.txt") << "red heart\nblue heart\n";
  std::ofstream(outside + "/metrics.jsonl") << R"({"step": 1, "loss": 42.0})" "\n";
  write_png(outside + "/loss.png", Image(2, 2));
  ASSERT_EQ(::symlink(outside.c_str(), (runs + "/escape").c_str()), 0);
  ASSERT_EQ(::symlink((outside + "/loss.png").c_str(), (runs + "/good/loss.png").c_str()), 0);

  std::atomic<bool> gate{false};
  auto gen = std::make_unique<FakeGenerator>();
  gen->gate = &gate;
  Running s(std::move(gen), runs, /*queue=*/2);

  // The page.
  auto page = s.client->Get("/");
  ASSERT_TRUE(page);
  EXPECT_EQ(page->status, 200);
  EXPECT_NE(page->body.find("<canvas"), std::string::npos);
  EXPECT_EQ(page->body.find("http://"), std::string::npos);  // nothing from the internet
  EXPECT_EQ(page->body.find("https://"), std::string::npos);

  // Bad requests: 400 with a one-line JSON error; unknown paths: 404 JSON.
  for (const char* body : {"{", R"({"prompt":"x","n":1000})", R"({"prompt":"x","cfg":1e999})", R"({"prompt":7})"}) {
    auto j = s.post(body, 400);
    ASSERT_TRUE(j.is_object()) << body;
    EXPECT_TRUE(j["error"].is_string());
    EXPECT_EQ(j["error"].get<std::string>().find('\n'), std::string::npos);
  }
  s.post(std::string(20000, 'x'), 413);
  {  // a request to another host name (DNS rebinding) is refused
    auto r = s.client->Get("/api/info", {{"Host", "evil.example:8188"}});
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 403);
    r = s.client->Get("/api/info", {{"Host", "localhost:8188"}});
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 200);
  }
  {  // a form post (what another web site could make a browser send) is refused
    auto r = s.client->Post("/api/generate", R"({"prompt":"x"})", "text/plain");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 415);
  }
  EXPECT_EQ(s.get("/api/nothing", 404)["error"], "not found");
  s.get("/api/jobs/999", 404);
  s.get("/api/jobs/1?after=x", 404);  // no such job yet

  // One running (held at the gate) + 2 waiting fill the queue; the next one gets 503.
  auto first = s.post(R"({"prompt":"red heart","n":3,"seed":40})", 202);
  for (int k = 0; k < 2000 && s.get("/api/jobs/1", 200)["status"] != "running"; ++k)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(s.get("/api/jobs/1", 200)["status"], "running");
  auto second = s.post(R"({"prompt":"blue heart","n":1})", 202);
  auto third = s.post(R"({"prompt":"frog","n":1})", 202);
  EXPECT_EQ(third["position"], 2);
  auto full = s.post(R"({"prompt":"one too many"})", 503);
  EXPECT_NE(full["error"].get<std::string>().find("queue is full"), std::string::npos);
  gate = true;
  auto done = s.wait_done(first["id"]);
  ASSERT_EQ(done["status"], "done") << done.dump();
  ASSERT_EQ(done["images"].size(), 3u);
  EXPECT_EQ(done["images"][2]["seed"], 42);
  EXPECT_EQ(done["command"], "microdit sample --seed 40");
  auto png = s.client->Get(done["images"][2]["url"].get<std::string>().c_str());
  ASSERT_TRUE(png);
  EXPECT_EQ(png->status, 200);
  EXPECT_EQ(png->get_header_value("Content-Type"), "image/png");
  const Image im = decode_png(png->body, d.path);
  EXPECT_EQ(im.width, 8);
  EXPECT_EQ(im.height, 6);
  EXPECT_EQ(im.pixels[0], 42);  // the seed's colour: the image of seed 40 + 2
  EXPECT_EQ(s.wait_done(second["id"])["status"], "done");
  EXPECT_EQ(s.wait_done(third["id"])["status"], "done");
  s.get("/api/jobs/1/images/3.png", 404);
  EXPECT_EQ(s.get("/api/jobs", 200)["jobs"].size(), 3u);

  // Runs: only 'good' is listed; metrics parsed (bad line skipped); the grid and its prompts.
  auto list = s.get("/api/runs", 200)["runs"];
  ASSERT_EQ(list.size(), 1u) << list.dump();
  EXPECT_EQ(list[0]["name"], "good");
  EXPECT_EQ(list[0]["step"], 2);
  EXPECT_DOUBLE_EQ(list[0]["loss"].get<double>(), 0.9);
  EXPECT_DOUBLE_EQ(list[0]["val_loss"].get<double>(), 1.0);
  auto m = s.get("/api/runs/good/metrics", 200);
  ASSERT_EQ(m["train"].size(), 2u);
  EXPECT_DOUBLE_EQ(m["train"][1][3].get<double>(), 31.5);
  ASSERT_EQ(m["val"].size(), 2u);
  auto samples = s.get("/api/runs/good/samples", 200);
  ASSERT_EQ(samples["grids"].size(), 1u);
  EXPECT_EQ(samples["grids"][0]["prompts"][1], "blue heart");
  auto grid = s.client->Get(samples["grids"][0]["url"].get<std::string>().c_str());
  ASSERT_TRUE(grid);
  EXPECT_EQ(grid->status, 200);
  EXPECT_EQ(decode_png(grid->body, d.path).width, 4);

  // Nothing outside --runs: traversal in every spelling, links out of the folder, hidden names.
  for (const char* path :
       {"/api/runs/escape/metrics", "/api/runs/escape", "/api/runs/../outside/metrics", "/api/runs/..%2Foutside/metrics",
        "/api/runs/%2E%2E/metrics", "/api/runs/good/files/../metrics.jsonl", "/api/runs/good/files/..%2F..%2Foutside%2Floss.png",
        "/api/runs/good/files/loss.png", "/api/runs/good/files/metrics.jsonl", "/api/runs/good/files/samples/step-0000002.txt",
        "/api/runs/.hidden/metrics", "/api/runs/good%00/metrics", "/../outside/loss.png", "/api/jobs/../../etc/passwd"}) {
    auto r = s.client->Get(path);
    ASSERT_TRUE(r) << path;
    EXPECT_EQ(r->status, 404) << path << ": " << r->body.substr(0, 100);
    EXPECT_EQ(r->body.find("42.0"), std::string::npos) << path;
  }
}

TEST(ServeHttp, StopEndsRunAndCancelsWaitingWork) {
  TempDir d;
  std::atomic<bool> gate{false};
  auto gen = std::make_unique<FakeGenerator>();
  gen->gate = &gate;
  serve::ServeOptions o;
  o.port = 0;
  o.runs = d.path;
  serve::Server server(o, std::move(gen));
  const int port = server.bind();
  std::thread t([&] { server.run(); });
  httplib::Client c("127.0.0.1", port);
  auto r = c.Post("/api/generate", R"({"prompt":"x","n":2})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 202);
  {  // the port is taken: a second server says so instead of sharing it
    serve::ServeOptions o2 = o;
    o2.port = port;
    serve::Server other(o2, std::make_unique<FakeGenerator>());
    EXPECT_NE(error_of([&] { other.bind(); }).find(fmt::format("cannot listen on 127.0.0.1:{}", port)),
              std::string::npos);
  }
  const auto t0 = std::chrono::steady_clock::now();
  server.stop();  // while a generation is held: run() must return promptly anyway
  t.join();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 5.0);
  EXPECT_FALSE(c.Get("/api/info"));  // nobody listens any more
  // A second server can take the same port at once.
  serve::ServeOptions o2 = o;
  o2.port = port;
  serve::Server again(o2, std::make_unique<FakeGenerator>());
  EXPECT_EQ(again.bind(), port);
}

namespace {
// A tiny pixel MicroDiT (8 x 8, random weights, MiniLM captions) written as a training
// checkpoint DIR/tiny.safetensors; returns its path.
std::string write_tiny_checkpoint(const std::string& dir) {
  auto cfg = test_util::tiny_config();
  cfg.caption_channels = 384;
  cfg.in_channels = 3;
  torch::manual_seed(0);
  MicroDiT model(cfg);
  {  // a random final layer: the zero-initialised one would make every picture the same
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.normal_(0, 0.05);
  }
  NamedTensors t;
  for (const auto& p : model->named_parameters()) t.emplace_back("model." + p.key(), p.value());
  for (const auto& b : model->named_buffers()) t.emplace_back("model." + b.key(), b.value());
  const std::string ckpt = dir + "/tiny.safetensors";
  write_safetensors(ckpt, t,
                    {{"microdit_config", config_to_yaml(cfg)},
                     {"caption_len", "16"},
                     {"sigma_data", "0.5"},
                     {"text_encoder", "minilm"}});
  return ckpt;
}
}  // namespace

// On the CPU the generator makes as many pictures at a time as there are threads, side by side:
// the same pixels as one at a time from the same seeds, reported in order.
TEST(ServeGenerator, PicturesSideBySideEqualOneAtATime) {
  if (!is_directory(text::minilm_dir())) GTEST_SKIP() << "MiniLM assets missing (scripts/setup.sh)";
  TempDir d;
  auto gen = serve::load_checkpoint_generator(write_tiny_checkpoint(d.path), "", "cpu", 1, "fp32");
  const int saved = at::get_num_threads();
  at::set_num_threads(2);
  serve::GenerateRequest r;
  r.prompt = "red heart";
  r.n = 3;  // a pair, then one
  r.steps = 2;
  r.cfg = 3;
  r.seed = 7;
  std::vector<int64_t> order;
  std::vector<Image> together;
  gen->generate(r, [&](int64_t i, const Image& im) { order.push_back(i), together.push_back(im); }, [] { return false; });
  std::vector<Image> alone;
  for (int64_t i = 0; i < r.n; ++i) {
    serve::GenerateRequest one = r;
    one.n = 1;
    one.seed = r.seed + static_cast<uint64_t>(i);
    gen->generate(one, [&](int64_t, const Image& im) { alone.push_back(im); }, [] { return false; });
  }
  at::set_num_threads(saved);
  EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2}));
  ASSERT_EQ(together.size(), 3u);
  ASSERT_EQ(alone.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(together[i].pixels, alone[i].pixels) << "picture " << i;
  EXPECT_NE(together[0].pixels, together[1].pixels);  // seeds differ
}

// The real generator: the tiny checkpoint loaded by the server, two pictures over HTTP that decode.
TEST(ServeHttp, TinyCheckpointMakesPngs) {
  if (!is_directory(text::minilm_dir())) GTEST_SKIP() << "MiniLM assets missing (scripts/setup.sh)";
  TempDir d;
  const std::string ckpt = write_tiny_checkpoint(d.path);
  Running s(serve::load_checkpoint_generator(ckpt, "", "cpu", 2), d.path);
  auto info = s.get("/api/info", 200);
  EXPECT_NE(info["model"].get<std::string>().find("8x8 pixels"), std::string::npos) << info.dump();
  auto job = s.post(R"({"prompt":"red heart","n":2,"steps":2,"cfg":3,"seed":7})", 202);
  auto done = s.wait_done(job["id"]);
  ASSERT_EQ(done["status"], "done") << done.dump();
  EXPECT_NE(done["command"].get<std::string>().find("--prompt 'red heart' --n 2 --steps 2 --cfg 3 --seed 7"),
            std::string::npos);
  for (int i = 0; i < 2; ++i) {
    auto png = s.client->Get(done["images"][i]["url"].get<std::string>().c_str());
    ASSERT_TRUE(png);
    const Image im = decode_png(png->body, d.path);
    EXPECT_EQ(im.width, 16);  // 8 x --scale 2
    EXPECT_EQ(im.height, 16);
  }
}
