// MDS reader and writer against datasets written by PyPI mosaicml-streaming 0.13.0
// (tools/make_mds_fixtures.py -> tests/data/mds_*), and streaming reading what we write
// (skipped without the streaming venv of scripts/setup_data.sh).
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <atomic>
#include <random>
#include <thread>

#include "core/error.h"
#include "core/fs.h"
#include "data/image_io.h"
#include "data/mds.h"
#include "test_util.h"

using namespace microdit;
using microdit::test_util::error_of;
using microdit::test_util::TempDir;
using microdit::test_util::streaming_python;
using nlohmann::json;

namespace {

const std::string kData = std::string(microdit::test_util::source_dir()) + "/tests/data/";

std::string slurp(const std::string& path) {
  EXPECT_TRUE(is_regular_file(path)) << path;
  return test_util::read_file_bytes(path);
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

const json& fixtures() {
  static const json j = json::parse(slurp(kData + "mds_fixtures.json"));
  return j;
}

std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out += static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16));
  return out;
}

uint32_t crc(const std::string& s) {
  return static_cast<uint32_t>(crc32(0L, reinterpret_cast<const Bytef*>(s.data()), static_cast<uInt>(s.size())));
}

// A payload against its fixture entry: {"hex"} or {"crc32", "bytes"}.
void expect_payload(const std::string& got, const json& want, const std::string& what) {
  if (want.contains("hex")) {
    EXPECT_EQ(got, unhex(want["hex"])) << what;
  } else {
    EXPECT_EQ(got.size(), want["bytes"].get<size_t>()) << what;
    EXPECT_EQ(crc(got), want["crc32"].get<uint32_t>()) << what;
  }
}

std::string zstd_decompress(const std::string& z) {
  const auto n = ZSTD_getFrameContentSize(z.data(), z.size());
  EXPECT_NE(n, ZSTD_CONTENTSIZE_UNKNOWN);
  EXPECT_NE(n, ZSTD_CONTENTSIZE_ERROR);
  std::string out(n, '\0');
  EXPECT_EQ(ZSTD_decompress(out.data(), out.size(), z.data(), z.size()), n);
  return out;
}

// A decoded ndarray against {"dtype", "shape", "values"}.
void expect_array(const at::Tensor& t, const json& want, const std::string& what) {
  const std::string dtype = want["dtype"];
  EXPECT_EQ(t.sizes().vec(), want["shape"].get<std::vector<int64_t>>()) << what;
  const auto flat = t.reshape({-1});
  ASSERT_EQ(flat.numel(), static_cast<int64_t>(want["values"].size())) << what;
  for (int64_t k = 0; k < flat.numel(); ++k) {
    if (dtype == "uint64")
      EXPECT_EQ(flat.to(torch::kUInt64).data_ptr<uint64_t>()[k], want["values"][k].get<uint64_t>()) << what;
    else
      EXPECT_EQ(flat.to(torch::kDouble)[k].item<double>(), want["values"][k].get<double>()) << what;
  }
}

// Payloads of every sample of a fixture dataset: from the JSON, or (latents) read back.
std::vector<std::vector<std::string>> fixture_payloads(const std::string& name, const json& d) {
  std::vector<std::vector<std::string>> out;
  std::unique_ptr<MDSDataset> ds;
  for (size_t i = 0; i < d["payloads"].size(); ++i) {
    std::vector<std::string> row;
    for (size_t c = 0; c < d["payloads"][i].size(); ++c) {
      const json& p = d["payloads"][i][c];
      if (p.contains("hex")) {
        row.push_back(unhex(p["hex"]));
      } else {
        if (!ds) ds = std::make_unique<MDSDataset>(std::vector<std::string>{kData + "mds_" + name});
        row.push_back(ds->get_raw(static_cast<int64_t>(i))[c]);
      }
    }
    out.push_back(std::move(row));
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> fixture_columns(const json& d) {
  std::vector<std::pair<std::string, std::string>> c;
  for (const auto& p : d["columns"]) c.emplace_back(p[0], p[1]);
  return c;
}

MDSWriterOptions fixture_options(const json& d) {
  MDSWriterOptions o;
  const json& kw = d["options"];
  o.size_limit = kw.contains("size_limit") ? std::optional<int64_t>(kw["size_limit"].get<int64_t>())
                                           : std::optional<int64_t>(1 << 26);
  if (kw.contains("compression")) o.compression = kw["compression"].get<std::string>();
  if (kw.contains("hashes")) o.hashes = kw["hashes"].get<std::vector<std::string>>();
  return o;
}

// Compares a dataset folder written by us with streaming's: index.json and every shard file
// byte for byte; compressed shards by their decompressed bytes (libzstd versions may differ).
void expect_same_dataset(const std::string& ours, const std::string& theirs) {
  const std::string a = slurp(ours + "/index.json"), b = slurp(theirs + "/index.json");
  const json ja = json::parse(a), jb = json::parse(b);
  ASSERT_EQ(ja["shards"].size(), jb["shards"].size()) << theirs;
  bool compressed = false;
  for (size_t i = 0; i < jb["shards"].size(); ++i) {
    json sa = ja["shards"][i], sb = jb["shards"][i];
    if (sb["zip_data"].is_object()) {
      compressed = true;
      const std::string za = slurp(ours + "/" + sa["zip_data"]["basename"].get<std::string>());
      const std::string zb = slurp(theirs + "/" + sb["zip_data"]["basename"].get<std::string>());
      EXPECT_EQ(zstd_decompress(za), zstd_decompress(zb)) << theirs << " shard " << i;
      EXPECT_EQ(sa["zip_data"]["bytes"].get<size_t>(), za.size());
      for (auto& [algo, hex] : sa["zip_data"]["hashes"].items()) EXPECT_EQ(hex, mds::hash_hex(algo, za));
      sa.erase("zip_data");
      sb.erase("zip_data");
    } else {
      const std::string f = sb["raw_data"]["basename"];
      EXPECT_EQ(slurp(ours + "/" + f), slurp(theirs + "/" + f)) << theirs << "/" << f;
    }
    EXPECT_EQ(sa, sb) << theirs << " shard " << i;
  }
  if (!compressed) {
    EXPECT_EQ(a, b) << theirs << "/index.json";
  }
}


}  // namespace

// ---- reader -------------------------------------------------------------------------------

TEST(MdsReader, LatentSchema) {
  const json& d = fixtures()["datasets"]["latent"];
  MDSDataset ds({kData + "mds_latent"});
  ASSERT_EQ(ds.size(), 2);
  ASSERT_EQ(ds.columns().size(), 4u);
  EXPECT_EQ(ds.columns()[1].name, "caption_latents");
  EXPECT_EQ(ds.columns()[1].encoding, "bytes");
  EXPECT_FALSE(ds.columns()[1].size.has_value());
  for (int64_t i = 0; i < 2; ++i) {
    const auto raw = ds.get_raw(i);
    for (size_t c = 0; c < 4; ++c) expect_payload(raw[c], d["payloads"][i][c], ds.columns()[c].name);
    EXPECT_EQ(ds.get(i, "caption"), d["values"][i]["caption"].get<std::string>());
    EXPECT_EQ(ds.get_columns(i, {2, 0}), (std::vector<std::string>{raw[2], raw[0]}));
    const auto cap = mds::caption_latent_tensor(ds.get(i, "caption_latents"), 4, "caption_latents");
    EXPECT_EQ(cap.sizes().vec(), (std::vector<int64_t>{1, 77, 4}));
    EXPECT_EQ(cap.scalar_type(), torch::kHalf);
    EXPECT_EQ(mds::latent_image_tensor(raw[2], 256, "latents_256").sizes().vec(), (std::vector<int64_t>{4, 32, 32}));
    EXPECT_EQ(mds::latent_image_tensor(raw[3], 512, "latents_512").sizes().vec(), (std::vector<int64_t>{1, 64, 64}));
  }
  EXPECT_NE(error_of([&] { mds::latent_image_tensor(std::string(100, 'x'), 256, "latents_256"); })
                .find("latents_256: 100 bytes are not float16 latents"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ds.get(0, "nope"); }).find("no column 'nope'"), std::string::npos);
  EXPECT_NE(error_of([&] { ds.get_raw(2); }).find("out of range"), std::string::npos);
  EXPECT_TRUE(is_mds_dir(kData + "mds_latent"));
  EXPECT_FALSE(is_mds_dir(kData));
}

TEST(MdsReader, EveryEncoding) {
  const json& d = fixtures()["datasets"]["encodings"];
  MDSDataset ds({kData + "mds_encodings"});
  ASSERT_EQ(ds.size(), 3);
  for (int64_t i = 0; i < ds.size(); ++i) {
    const auto raw = ds.get_raw(i);
    for (size_t c = 0; c < ds.columns().size(); ++c) {
      const auto& col = ds.columns()[c];
      const std::string what = fmt::format("sample {} column {} ({})", i, col.name, col.encoding);
      SCOPED_TRACE(what);
      expect_payload(raw[c], d["payloads"][i][c], what);
      if (col.size) {
        EXPECT_EQ(static_cast<int64_t>(raw[c].size()), *col.size);
      }
      const json& values = d["values"][i];
      if (col.encoding.rfind("ndarray", 0) == 0) {
        expect_array(mds::decode_ndarray(col.encoding, raw[c], what), values[col.name], what);
      } else if (col.encoding == "jpeg" || col.encoding == "png") {
        const Image img = decode_image_bytes(raw[c], what);
        EXPECT_EQ(img.width, col.encoding == "jpeg" ? 8 : 5);
      } else if (col.encoding == "str_decimal") {
        EXPECT_EQ(mds::decode_value(col.encoding, raw[c], what).get<double>(),
                  std::stod(values[col.name].get<std::string>()));
      } else if (col.encoding != "bytes") {
        EXPECT_EQ(mds::decode_value(col.encoding, raw[c], what), values[col.name]);
      }
    }
  }
  // The encoders give streaming's payloads.
  const auto pay = [&](int i, const std::string& col) { return unhex(d["payloads"][i][ds.column_index(col)]["hex"]); };
  EXPECT_EQ(mds::encode_int(-(int64_t{1} << 40) - 1), pay(1, "a_int"));
  EXPECT_EQ(mds::encode_scalar_int("int8", -100), pay(1, "b_int8"));
  EXPECT_EQ(mds::encode_scalar_int("uint32", 4000000001), pay(1, "h_uint32"));
  EXPECT_EQ(mds::encode_scalar("float16", -0.333), pay(1, "j_float16"));
  EXPECT_EQ(mds::encode_scalar("float32", -1.5e-7), pay(1, "k_float32"));
  EXPECT_EQ(mds::encode_scalar("str_float", -0.2), pay(1, "n_str_float"));
  EXPECT_EQ(mds::encode_scalar_int("str_int", -1000000000000001), pay(1, "m_str_int"));
  EXPECT_EQ(mds::encode_ndarray("ndarray:int16:2,3", -torch::arange(6, torch::kShort).reshape({2, 3})),
            pay(1, "p_nd_fixed"));
  EXPECT_EQ(mds::encode_ndarray("ndarray", torch::arange(6, torch::kFloat).reshape({2, 3})), pay(0, "r_nd"));
  EXPECT_EQ(mds::encode_ndarray("ndarray", torch::arange(302, torch::kByte).reshape({1, 302})), pay(2, "x_nd_wide"));
  EXPECT_EQ(mds::encode_ndarray("ndarray:float32", torch::linspace(-1, 1, 3).reshape({1, 3})), pay(1, "q_nd_dtype"));
  EXPECT_EQ(mds::encode_json(json{{"a", "x\u00ff"}, {"n", 1}}), "{\"a\": \"x\\u00ff\", \"n\": 1}");
  EXPECT_EQ(mds::python_json_dumps(json{{"k", {1.0, 1e-5, 0.1, nullptr, true, "\xf0\x9f\x90\xb1\"\n"}}}),
            "{\"k\": [1.0, 1e-05, 0.1, null, true, \"\\ud83d\\udc31\\\"\\n\"]}");
  // Sizes and refusals.
  EXPECT_EQ(mds::encoded_size("ndarray:float16:77,1024"), 157696);
  EXPECT_EQ(mds::encoded_size("int"), 8);
  EXPECT_FALSE(mds::encoded_size("ndarray:float16").has_value());
  EXPECT_FALSE(mds::is_encoding("ndarray:float17"));
  EXPECT_FALSE(mds::is_encoding("ndarray:int8:0"));
  EXPECT_NE(error_of([] { mds::encode_ndarray("ndarray", torch::zeros({0, 3})); }).find("0 elements"), std::string::npos);
  EXPECT_NE(error_of([] { mds::encode_ndarray("ndarray", torch::zeros({})); }).find("scalar"), std::string::npos);
  EXPECT_NE(error_of([] { mds::decode_ndarray("ndarray:float32:2", std::string(7, 'x'), "col"); })
                .find("col: ndarray of float32 2 (2 values) needs 8 bytes, the payload has 7"),
            std::string::npos);
  EXPECT_NE(error_of([] { mds::decode_value("pkl", "x", "col"); }).find("pkl"), std::string::npos);
}

TEST(MdsReader, ZstdHashesAndEmptyShards) {
  const json& d = fixtures()["datasets"]["zstd"];
  TempDir tmp;
  MDSReadOptions opt;
  opt.decompress_dir = tmp / "cache";
  opt.verify_hashes = true;
  {
    MDSDataset ds({kData + "mds_zstd"}, opt);
    ASSERT_EQ(ds.size(), 5);
    EXPECT_EQ(ds.shards().size(), 5u);  // the leading 0-sample shard is skipped
    for (int64_t i = 0; i < 5; ++i) {
      const auto raw = ds.get_raw(4 - i);  // out of order
      for (size_t c = 0; c < raw.size(); ++c) expect_payload(raw[c], d["payloads"][4 - i][c], "zstd");
      expect_array(mds::decode_ndarray("ndarray:float32", raw[0]), d["values"][4 - i]["arr"], "arr");
    }
  }
  // Decompressed copies stay in a given folder and are reused.
  EXPECT_TRUE(is_directory(tmp / "cache"));
  EXPECT_EQ(list_dir(tmp / "cache").size(), 5u);
  // The index's hashes (sha1, xxh64) of the raw and compressed bytes are ours too.
  const json idx = json::parse(slurp(kData + "mds_zstd/index.json"));
  for (const auto& s : idx["shards"]) {
    const std::string zip = slurp(kData + "mds_zstd/" + s["zip_data"]["basename"].get<std::string>());
    const std::string raw = zstd_decompress(zip);
    EXPECT_EQ(raw.size(), s["raw_data"]["bytes"].get<size_t>());
    for (const char* algo : {"sha1", "xxh64"}) {
      EXPECT_EQ(mds::hash_hex(algo, raw), s["raw_data"]["hashes"][algo].get<std::string>()) << algo;
      EXPECT_EQ(mds::hash_hex(algo, zip), s["zip_data"]["hashes"][algo].get<std::string>()) << algo;
    }
  }
  const json idx7 = json::parse(slurp(kData + "mds_zstd7/index.json"));
  const std::string raw7 = zstd_decompress(slurp(kData + "mds_zstd7/shard.00000.mds.zstd"));
  for (const char* algo : {"md5", "sha256", "xxh64"})
    EXPECT_EQ(mds::hash_hex(algo, raw7), idx7["shards"][0]["raw_data"]["hashes"][algo].get<std::string>());
  // xxh64 on inputs of every length class (< 4, < 8, < 32, >= 32 bytes), by Python's xxhash.
  EXPECT_EQ(mds::hash_hex("xxh64", ""), "ef46db3751d8e999");
  EXPECT_EQ(mds::hash_hex("xxh64", "abc"), "44bc2cf5ad770999");
  EXPECT_NE(error_of([] { mds::hash_hex("xxh3_64", "x"); }).find("unsupported"), std::string::npos);
  // Reading again reuses the decompressed copies.
  MDSDataset again({kData + "mds_zstd"}, opt);
  EXPECT_EQ(again.get_raw(0), MDSDataset({kData + "mds_zstd"}).get_raw(0));
}

TEST(MdsReader, StreamsShardsGzEmptyAndRefusals) {
  // Streams must share columns: merged has (caption, idx), multi (id, text).
  EXPECT_NE(error_of([&] { MDSDataset({kData + "mds_merged", kData + "mds_multi"}); }).find("columns differ"),
            std::string::npos);
  MDSDataset merged({kData + "mds_merged"});
  const json& m = fixtures()["merged"];
  ASSERT_EQ(merged.size(), 5);
  for (int64_t i = 0; i < 5; ++i) {
    const json& part = m[i < 3 ? "0" : "1"];
    const int64_t k = i < 3 ? i : i - 3;
    EXPECT_EQ(merged.get(i, "caption"), part["values"][k]["caption"].get<std::string>());
    EXPECT_EQ(mds::decode_value("int", merged.get(i, "idx")), part["values"][k]["idx"]);
  }
  // The two parts as two streams: the same global order.
  MDSDataset parts({kData + "mds_merged/0", kData + "mds_merged/1"});
  ASSERT_EQ(parts.size(), 5);
  EXPECT_EQ(parts.stream_begin(1), 3);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(parts.get_raw(i), merged.get_raw(i));
  // multi: 40 samples in 3 shards; gz: 3 in a gz-compressed shard; empty: none.
  MDSDataset multi({kData + "mds_multi", kData + "mds_empty", kData + "mds_gz"});
  ASSERT_EQ(multi.size(), 43);
  EXPECT_EQ(multi.shards().size(), 4u);
  EXPECT_EQ(multi.stream_size(0), 40);
  EXPECT_EQ(multi.stream_size(1), 0);
  EXPECT_EQ(multi.stream_begin(2), 40);
  EXPECT_EQ(multi.stream_size(2), 3);
  EXPECT_EQ(multi.shards()[2].begin, 28);
  const json& mv = fixtures()["datasets"]["multi"]["values"];
  for (int64_t i = 0; i < 40; ++i) EXPECT_EQ(mds::decode_value("int", multi.get(i, "id")), mv[i]["id"]);
  for (int64_t i = 0; i < 3; ++i)
    EXPECT_EQ(multi.get(40 + i, "text"), fixtures()["datasets"]["gz"]["values"][i]["text"].get<std::string>());
  EXPECT_EQ(MDSDataset({kData + "mds_empty"}).size(), 0);
  EXPECT_NE(error_of([] { MDSDataset({kData + "mds_br"}); }).find("compression 'br' is not supported"),
            std::string::npos);
  EXPECT_NE(error_of([] { MDSDataset({kData + "no_such"}); }).find("no_such/index.json: no such file"),
            std::string::npos);
}

TEST(MdsReader, CorruptFilesGiveOneLine) {
  TempDir tmp;
  auto fresh = [&](const std::string& name) {
    const std::string d = tmp / name;
    [[maybe_unused]] int rc = std::system(("cp -r '" + kData + "mds_multi' '" + d + "'").c_str());
    return d;
  };
  auto err = [](const std::string& dir, int64_t i = 0) {
    return error_of([&] { MDSDataset({dir}).get_raw(i); });
  };
  // Truncated shard.
  std::string d = fresh("trunc");
  std::string shard = slurp(d + "/shard.00001.mds");
  spit(d + "/shard.00001.mds", shard.substr(0, shard.size() - 3));
  EXPECT_NE(err(d, 20).find("corrupt MDS shard " + d + "/shard.00001.mds"), std::string::npos) << err(d, 20);
  // An offset pointing past the end.
  d = fresh("offset");
  shard = slurp(d + "/shard.00000.mds");
  shard[4 * 3] = '\xff';
  shard[4 * 3 + 1] = '\xff';
  spit(d + "/shard.00000.mds", shard);
  EXPECT_NE(err(d, 1).find("corrupt MDS shard " + d + "/shard.00000.mds: sample 1 has offsets"), std::string::npos)
      << err(d, 1);
  // A sample whose size header overruns it.
  d = fresh("sizes");
  shard = slurp(d + "/shard.00000.mds");
  const uint32_t off0 = *reinterpret_cast<const uint32_t*>(&shard[4]);
  shard[off0] = '\x7f';
  spit(d + "/shard.00000.mds", shard);
  EXPECT_NE(err(d, 0).find("overruns the sample"), std::string::npos) << err(d, 0);
  // Sample count in the file disagrees with index.json.
  d = fresh("count");
  shard = slurp(d + "/shard.00002.mds");
  shard[0] = 5;
  spit(d + "/shard.00002.mds", shard);
  EXPECT_NE(err(d, 30).find("holds 5 samples, index.json says 12"), std::string::npos) << err(d, 30);
  // Missing shard, bad JSON, wrong version, pkl column, unknown format.
  d = fresh("missing");
  std::remove((d + "/shard.00001.mds").c_str());
  EXPECT_NE(err(d).find(d + "/shard.00001.mds: missing shard file"), std::string::npos) << err(d);
  d = fresh("json");
  spit(d + "/index.json", "{\"shards\": [");
  EXPECT_NE(err(d).find(d + "/index.json: not valid JSON"), std::string::npos) << err(d);
  const std::string index = slurp(kData + "mds_multi/index.json");
  auto edited = [&](const std::string& name, const std::string& from, const std::string& to) {
    std::string dir = fresh(name), s = index;
    for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
    spit(dir + "/index.json", s);
    return dir;
  };
  d = edited("version", "\"version\": 2, \"zip_data\"", "\"version\": 3, \"zip_data\"");
  EXPECT_NE(err(d).find("shard version 3"), std::string::npos) << err(d);
  d = edited("pkl", "\"column_encodings\": [\"int\", \"str\"]", "\"column_encodings\": [\"int\", \"pkl\"]");
  EXPECT_NE(err(d).find("column 'text' uses the pkl encoding"), std::string::npos) << err(d);
  d = edited("format", "\"format\": \"mds\"", "\"format\": \"json\"");
  EXPECT_NE(err(d).find("shard format 'json' (only MDS shards are read)"), std::string::npos) << err(d);
  for (const std::string& e : {err(fresh("ok"), 50), err(d)}) EXPECT_EQ(e.find('\n'), std::string::npos);
}

TEST(MdsReader, ThreadsAndFewOpenFiles) {
  // Several threads, shard handles evicted while others use them, zstd shards decompressed
  // on first use into a private folder.
  MDSReadOptions opt;
  opt.max_open_files = 2;
  MDSDataset multi({kData + "mds_multi"}, opt), zstd({kData + "mds_zstd"}, opt);
  const MDSDataset plain({kData + "mds_multi"});
  std::vector<std::vector<std::string>> want;
  for (int64_t i = 0; i < plain.size(); ++i) want.push_back(plain.get_raw(i));
  const json& zv = fixtures()["datasets"]["zstd"]["payloads"];
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int k = 0; k < 400; ++k) {
        const int64_t i = rng() % want.size();
        if (multi.get_raw(i) != want[i]) ++bad;
        const int64_t j = rng() % 5;
        if (zstd.get(j, "text") != unhex(zv[j][2]["hex"])) ++bad;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(MdsReader, RandomDamageNeverCrashes) {
  TempDir tmp;
  const std::string good = slurp(kData + "mds_encodings/shard.00000.mds");
  const std::string index = slurp(kData + "mds_encodings/index.json");
  std::mt19937 rng(7);
  int refused = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string s = good;
    for (int k = 0; k < 1 + trial % 4; ++k) s[rng() % s.size()] = static_cast<char>(rng());
    if (trial % 5 == 0) s.resize(rng() % s.size());
    const std::string d = tmp / std::to_string(trial);
    make_dirs(d);
    spit(d + "/index.json", index);
    spit(d + "/shard.00000.mds", s);
    const std::string e = error_of([&] {
      MDSDataset ds({d});
      for (int64_t i = 0; i < ds.size(); ++i) ds.get_raw(i);
    });
    refused += !e.empty();
    if (!e.empty()) {
      EXPECT_NE(e.find("shard.00000.mds"), std::string::npos) << e;
    }
  }
  EXPECT_GT(refused, 50);
}

// ---- writer -------------------------------------------------------------------------------

TEST(MdsWriter, ByteIdenticalToStreaming) {
  TempDir tmp;
  for (const std::string name : {"latent", "encodings", "multi", "empty", "zstd", "zstd7"}) {
    SCOPED_TRACE(name);
    const json& d = fixtures()["datasets"][name];
    MDSWriter w(tmp / name, fixture_columns(d), fixture_options(d));
    for (const auto& row : fixture_payloads(name, d)) w.write(row);
    w.finish();
    expect_same_dataset(tmp / name, kData + "mds_" + name);
  }
  // Two parts merged like streaming's merge_index.
  for (const std::string sub : {"0", "1"}) {
    const json& d = fixtures()["merged"][sub];
    MDSWriter w(tmp / ("merged/" + sub), fixture_columns(d), fixture_options(d));
    for (const auto& row : fixture_payloads("", d)) w.write(row);
    w.finish();
    expect_same_dataset(tmp / ("merged/" + sub), kData + "mds_merged/" + sub);
  }
  mds_merge_index(tmp / "merged", {"0", "1"});
  EXPECT_EQ(slurp(tmp / "merged/index.json"), slurp(kData + "mds_merged/index.json"));
}

TEST(MdsWriter, SpecWorkedExample) {
  // DATA_PATH.md 3.7: two latent-schema samples make a 349-byte shard.
  TempDir tmp;
  MDSWriterOptions o;
  o.size_limit = 268435456;
  MDSWriter w(tmp.path, mds::latent_schema(), o);
  const std::string one = unhex("003c"), zero = unhex("0000");
  for (int i = 0; i < 2; ++i) w.write({"cap0", one + one + one, zero + one, unhex("010203")});
  w.finish();
  const std::string f = slurp(tmp / "shard.00000.mds");
  ASSERT_EQ(f.size(), 349u);
  EXPECT_EQ(f.substr(0, 16), unhex("020000001b0100003c0100005d010000"));
  EXPECT_EQ(f.substr(16, 267), w.config_json());
  EXPECT_EQ(f.substr(283, 33), unhex("04000000060000000400000003000000") + "cap0" + unhex("003c003c003c0000003c010203"));
  MDSDataset ds({tmp.path});
  EXPECT_EQ(ds.get(1, "latents_512"), unhex("010203"));
}

TEST(MdsWriter, ResumesAfterAnInterruptedRun) {
  const json& d = fixtures()["datasets"]["multi"];
  const auto rows = fixture_payloads("multi", d);
  TempDir tmp;
  std::vector<json> done;
  {
    MDSWriter w(tmp.path, fixture_columns(d), fixture_options(d));
    for (size_t i = 0; i < 20; ++i) w.write(rows[i]);
    done = w.shards();  // what `prepare` would persist; the pending samples are lost
    EXPECT_EQ(done.size(), 1u);
    EXPECT_EQ(w.flushed_samples(), 14);
    EXPECT_EQ(w.pending_samples(), 6);
  }
  EXPECT_FALSE(is_regular_file(tmp / "index.json"));
  MDSWriter w(tmp.path, fixture_columns(d), fixture_options(d), done);
  for (size_t i = static_cast<size_t>(w.flushed_samples()); i < rows.size(); ++i) w.write(rows[i]);
  w.finish();
  expect_same_dataset(tmp.path, kData + "mds_multi");
  // A resume with another configuration, or a finished shard gone, is refused.
  auto other = fixture_options(d);
  other.size_limit = 1000;
  EXPECT_NE(error_of([&] { MDSWriter(tmp.path, fixture_columns(d), other, done); }).find("another MDS configuration"),
            std::string::npos);
  std::remove((tmp / "shard.00000.mds").c_str());
  EXPECT_NE(error_of([&] { MDSWriter(tmp.path, fixture_columns(d), fixture_options(d), done); })
                .find("shard file is missing"),
            std::string::npos);
}

TEST(MdsWriter, RefusesBadInput) {
  TempDir tmp;
  const std::vector<std::pair<std::string, std::string>> cols = {{"b", "int"}, {"a", "str"}};
  MDSWriter w(tmp.path, cols);
  EXPECT_EQ(w.columns()[0].name, "a");  // sorted
  EXPECT_NE(error_of([&] { w.write({"x"}); }).find("1 payloads for 2 columns"), std::string::npos);
  EXPECT_NE(error_of([&] { w.write({"x", "abc"}); }).find("column 'b' (int) needs 8 bytes, got 3"), std::string::npos);
  MDSWriterOptions o;
  o.compression = "br";
  EXPECT_NE(error_of([&] { MDSWriter(tmp / "x", cols, o); }).find("unsupported MDS compression 'br'"), std::string::npos);
  o.compression.reset();
  o.hashes = {"xxh64", "sha1"};
  EXPECT_NE(error_of([&] { MDSWriter(tmp / "x", cols, o); }).find("must be sorted"), std::string::npos);
  o.hashes = {"xxh3_64"};
  EXPECT_NE(error_of([&] { MDSWriter(tmp / "x", cols, o); }).find("unsupported MDS hash"), std::string::npos);
  EXPECT_NE(error_of([&] { MDSWriter(tmp / "x", {{"a", "ndarray:x"}}); }).find("unknown MDS encoding"),
            std::string::npos);
  // The latent schema's config is DATA_PATH.md's 267 bytes.
  MDSWriterOptions lo;
  lo.size_limit = 268435456;
  EXPECT_EQ(MDSWriter(tmp / "lat", mds::latent_schema(), lo).config_json().size(), 267u);
}

TEST(MdsWriter, StreamingReadsOurOutput) {
  const std::string py = streaming_python();
  if (py.empty()) GTEST_SKIP() << "mosaicml-streaming venv not found (scripts/setup_data.sh makes it)";
  TempDir tmp;
  // Latent schema (uncompressed, merged from two parts) and zstd + hashes with empty shards.
  const json& lat = fixtures()["datasets"]["latent"];
  const auto lat_rows = fixture_payloads("latent", lat);
  for (const std::string sub : {"0", "1"}) {
    MDSWriterOptions o;
    o.size_limit = 20000;  // one sample per shard
    MDSWriter w(tmp / ("lat/" + sub), mds::latent_schema(), o);
    for (const auto& row : lat_rows) w.write(row);
    w.finish();
  }
  mds_merge_index(tmp / "lat", {"0", "1"});
  const json& z = fixtures()["datasets"]["zstd"];
  MDSWriter wz(tmp / "zstd", fixture_columns(z), fixture_options(z));
  for (const auto& row : fixture_payloads("zstd", z)) wz.write(row);
  wz.finish();
  const std::string out = tmp / "out.json";
  const std::string cmd = "cd /tmp && '" + py + "' '" + microdit::test_util::source_dir() + "/tools/read_mds_with_streaming.py' '" +
                          tmp / "lat" + "' '" + tmp / "zstd" + "' > '" + out + "' 2> '" + out + ".err'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << slurp(out + ".err");
  const json got = json::parse(slurp(out));
  ASSERT_EQ(got["size"].get<int>(), 9);
  for (int i = 0; i < 4; ++i) {
    const json& s = got["samples"][i];
    EXPECT_EQ(s["caption"], lat["values"][i % 2]["caption"]);
    for (const char* c : {"caption_latents", "latents_256", "latents_512"}) {
      const int col = c[0] == 'c' ? 1 : c[8] == '2' ? 2 : 3;
      EXPECT_EQ(s[c], lat["payloads"][i % 2][col]) << c;
    }
  }
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(got["samples"][4 + i]["id"], z["values"][i]["id"]);
    EXPECT_EQ(got["samples"][4 + i]["text"], z["values"][i]["text"]);
    EXPECT_EQ(got["samples"][4 + i]["arr"], z["values"][i]["arr"]);
  }
}
