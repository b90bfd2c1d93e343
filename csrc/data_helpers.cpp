// Index builders behind the GPT and blended datasets: document order, sample windows, blending and
// shuffles, plus the sample gather that turns (document, offset) boundaries into token rows.
//
// Index arrays are int32 when every value fits and int64 otherwise, so small corpora keep small
// caches while a 10^10-token corpus still works.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// ---------------------------------------------------------------------------------------------
// A small deterministic PRNG (SplitMix64): the same seed gives the same shuffles on every
// platform and numpy version, which the on-disk index cache and resumption rely on.
struct SplitMix64 {
  uint64_t s;
  explicit SplitMix64(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) without modulo bias (Lemire's multiply-and-reject).
  uint64_t below(uint64_t n) {
    __uint128_t m = static_cast<__uint128_t>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<__uint128_t>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
};

template <typename T>
void fisher_yates(T* a, int64_t n, SplitMix64& rng) {
  for (int64_t i = n - 1; i > 0; --i) std::swap(a[i], a[rng.below(static_cast<uint64_t>(i) + 1)]);
}

// Read-only view over an int32/uint32/int64 index array, so one loop serves every index dtype.
struct IndexView {
  const void* p = nullptr;
  int kind = 0;  // 0: int32, 1: uint32, 2: int64
  int64_t n = 0;
  explicit IndexView(const py::array& a, const char* what) {
    if (a.ndim() < 1 || !(a.flags() & py::array::c_style))
      throw std::invalid_argument(std::string(what) + " must be a C-contiguous array");
    n = a.size();
    p = a.data();
    char k = a.dtype().kind();
    size_t s = a.itemsize();
    if ((k == 'i' || k == 'u') && s == 8) kind = 2;
    else if (k == 'i' && s == 4) kind = 0;
    else if (k == 'u' && s == 4) kind = 1;
    else throw std::invalid_argument(std::string(what) + " must be int32, uint32 or int64");
  }
  int64_t operator[](int64_t i) const {
    switch (kind) {
      case 0: return static_cast<const int32_t*>(p)[i];
      case 1: return static_cast<const uint32_t*>(p)[i];
      default: return static_cast<const int64_t*>(p)[i];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Document order: each epoch is its own permutation of the split's documents, so every epoch
// shows every document exactly once.

template <typename T>
py::array document_index_impl(const IndexView& docs, int64_t num_epochs, uint64_t seed) {
  int64_t n = docs.n;
  py::array_t<T> out(n * num_epochs);
  T* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    SplitMix64 rng(seed);
    for (int64_t e = 0; e < num_epochs; ++e) {
      T* block = o + e * n;
      for (int64_t i = 0; i < n; ++i) block[i] = static_cast<T>(docs[i]);
      fisher_yates(block, n, rng);
    }
  }
  return out;
}

py::array build_document_index(py::array documents, int64_t num_epochs, uint64_t seed) {
  IndexView docs(documents, "documents");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be >= 1");
  int64_t max_id = 0;
  for (int64_t i = 0; i < docs.n; ++i) max_id = std::max(max_id, docs[i]);
  if (max_id <= INT32_MAX) return document_index_impl<int32_t>(docs, num_epochs, seed);
  return document_index_impl<int64_t>(docs, num_epochs, seed);
}

// A shuffled arange(n): the order in which samples are served.
py::array build_shuffle_index(int64_t n, uint64_t seed) {
  SplitMix64 rng(seed ^ 0x5DEECE66DULL);
  if (n <= INT32_MAX) {
    py::array_t<int32_t> out(n);
    int32_t* o = out.mutable_data();
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<int32_t>(i);
    fisher_yates(o, n, rng);
    return out;
  }
  py::array_t<int64_t> out(n);
  int64_t* o = out.mutable_data();
  py::gil_scoped_release nogil;
  for (int64_t i = 0; i < n; ++i) o[i] = i;
  fisher_yates(o, n, rng);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Sample index. Concatenate the documents in `doc_idx` order into one token stream of length N.
// Sample i reads the window [i*L, i*L + L + extra) of that stream, so consecutive samples share
// `extra` boundary tokens (1: inputs and shifted labels come from one window of L+1 tokens).
// Row i of the output is boundary i as (position in doc_idx, offset in that document); sample i
// spans rows i and i+1, the end row naming its last token t as (doc of t, offset of t + 1 - extra).
// This is exactly the layout Megatron's GPT dataset reads, so the two caches are interchangeable.
//
// Boundary i (i >= 1) is fixed by its token position alone, which makes the build embarrassingly
// parallel: threads sum the document sizes of their slice of doc_idx, learn where their slice
// starts in the stream, and each emits the boundaries that fall inside its slice.

// Emits boundaries [first, last] whose last token falls in documents [d_begin, d_end) of the
// stream, the first of which starts at stream position `pos`. Returns false on an id outside sizes.
template <typename T, typename I>
bool emit_boundaries(const int32_t* sizes, uint64_t num_sizes, const I* doc, int64_t d_begin, int64_t d_end,
                     int64_t pos, int64_t first, int64_t last, int64_t seq_len, int64_t extra, T* out) {
  // Boundary b's last token sits at stream position b*L + extra - 1.
  int64_t b = first;
  int64_t target = b * seq_len + extra - 1;
  for (int64_t d = d_begin; d < d_end && b <= last; ++d) {
    if (d + 16 < d_end) __builtin_prefetch(sizes + static_cast<uint64_t>(doc[d + 16]));  // never faults, even out of range
    uint64_t id = static_cast<uint64_t>(static_cast<int64_t>(doc[d]));
    if (id >= num_sizes) return false;
    int64_t end = pos + sizes[id];
    while (target < end && b <= last) {
      out[2 * b] = static_cast<T>(d);
      out[2 * b + 1] = static_cast<T>(target - pos + 1 - extra);
      ++b;
      target += seq_len;
    }
    pos = end;
  }
  return true;
}

template <typename I>
bool sum_sizes(const int32_t* sizes, uint64_t num_sizes, const I* doc, int64_t d_begin, int64_t d_end,
               int64_t* sum) {
  int64_t s = 0;
  for (int64_t d = d_begin; d < d_end; ++d) {
    if (d + 16 < d_end) __builtin_prefetch(sizes + static_cast<uint64_t>(doc[d + 16]));  // never faults, even out of range
    uint64_t id = static_cast<uint64_t>(static_cast<int64_t>(doc[d]));
    if (id >= num_sizes) return false;
    s += sizes[id];
  }
  *sum = s;
  return true;
}

template <typename T, typename I>
py::array sample_index_impl(const int32_t* sizes, int64_t num_sizes, const I* doc, int64_t D, int64_t seq_len,
                            int64_t total_tokens, bool drop_last, int64_t extra, int num_threads) {
  int64_t usable = total_tokens - extra;
  int64_t num_samples = usable <= 0 ? 0
                        : drop_last ? usable / seq_len
                                    : (usable + seq_len - 1) / seq_len;
  py::array_t<T> out({num_samples + 1, static_cast<int64_t>(2)});
  T* o = out.mutable_data();
  const uint64_t n = static_cast<uint64_t>(num_sizes);
  bool ok = n > 0 || D == 0;
  if (ok) {
    py::gil_scoped_release nogil;
    o[0] = 0;
    o[1] = 0;
    // The final boundary of a kept partial sample lies past the stream: it ends at the last doc.
    int64_t last = num_samples;
    if (num_samples > 0 && num_samples * seq_len + extra - 1 >= total_tokens) {
      uint64_t id = static_cast<uint64_t>(static_cast<int64_t>(doc[D - 1]));
      ok = id < n;
      o[2 * num_samples] = static_cast<T>(D - 1);
      o[2 * num_samples + 1] = static_cast<T>(ok ? sizes[id] - extra : 0);
      last = num_samples - 1;
    }
    // Threads pay off only on large inputs; below ~1M documents one thread is faster.
    int T_ = std::max(1, std::min<int>(num_threads, static_cast<int>(D >> 20) + 1));
    std::vector<int64_t> starts(T_ + 1, 0), pos(T_ + 1, 0);
    std::vector<char> good(T_, 1);
    for (int t = 0; t <= T_; ++t) starts[t] = D * t / T_;
    auto emit_slice = [&](int t) {
      // First boundary whose last token lies at or after this slice's start: b*L >= pos - extra + 1.
      int64_t need = pos[t] - extra + 1;
      int64_t first = need <= seq_len ? 1 : (need + seq_len - 1) / seq_len;
      good[t] = emit_boundaries<T, I>(sizes, n, doc, starts[t], starts[t + 1], pos[t], first, last, seq_len,
                                      extra, o);
    };
    if (T_ == 1) {
      emit_slice(0);
    } else {
      // Each thread sums the sizes of its slice, so every slice learns where it starts in the stream.
      std::vector<std::thread> pool;
      for (int t = 1; t < T_; ++t)
        pool.emplace_back([&, t] { good[t] = sum_sizes(sizes, n, doc, starts[t - 1], starts[t], &pos[t]); });
      good[0] = sum_sizes(sizes, n, doc, starts[T_ - 1], starts[T_], &pos[T_]);
      for (auto& th : pool) th.join();
      for (int t = 0; t < T_; ++t) ok = ok && good[t];
      if (ok) {
        for (int t = 1; t <= T_; ++t) pos[t] += pos[t - 1];
        pool.clear();
        for (int t = 1; t < T_; ++t) pool.emplace_back(emit_slice, t);
        emit_slice(0);
        for (auto& th : pool) th.join();
      }
    }
    for (int t = 0; t < T_; ++t) ok = ok && good[t];
  }
  if (!ok) throw std::out_of_range("document_index holds ids outside the " + std::to_string(num_sizes) + " sizes");
  return out;
}

template <typename T>
py::array sample_index_dispatch(const int32_t* s, int64_t n, const py::array& di, int64_t seq_len, int64_t total,
                                bool drop_last, int64_t extra, int threads) {
  char k = di.dtype().kind();
  size_t item = di.itemsize();
  int64_t D = di.size();
  if (k == 'i' && item == 4)
    return sample_index_impl<T>(s, n, static_cast<const int32_t*>(di.data()), D, seq_len, total, drop_last, extra, threads);
  if (k == 'u' && item == 4)
    return sample_index_impl<T>(s, n, static_cast<const uint32_t*>(di.data()), D, seq_len, total, drop_last, extra, threads);
  return sample_index_impl<T>(s, n, static_cast<const int64_t*>(di.data()), D, seq_len, total, drop_last, extra, threads);
}

py::array build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                           py::array document_index, int64_t seq_len, int64_t num_epochs,
                           int64_t tokens_per_epoch, bool drop_last, int64_t add_extra_token,
                           int num_threads) {
  if (seq_len < 1) throw std::invalid_argument("seq_len must be >= 1");
  if (add_extra_token != 0 && add_extra_token != 1) throw std::invalid_argument("add_extra_token is 0 or 1");
  IndexView check(document_index, "document_index");  // dtype and layout checks only
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int64_t total = num_epochs * tokens_per_epoch;
  // Megatron's dtype rule, int32 when positions and offsets fit: sizes are int32, so offsets always
  // do, and positions do while the document index has fewer than 2^31 entries.
  if (check.n <= INT32_MAX)
    return sample_index_dispatch<int32_t>(sizes.data(), sizes.size(), document_index, seq_len, total, drop_last,
                                          add_extra_token, num_threads);
  return sample_index_dispatch<int64_t>(sizes.data(), sizes.size(), document_index, seq_len, total, drop_last,
                                        add_extra_token, num_threads);
}

// ---------------------------------------------------------------------------------------------
// Blending: sample k goes to the dataset furthest below its target share after k+1 samples, so at
// every prefix each dataset's count is within one sample of weight * prefix length.

py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                 int64_t size) {
  int64_t K = weights.size();
  if (K < 1 || K > 32767) throw std::invalid_argument("blending needs between 1 and 32767 datasets");
  std::vector<double> w(weights.data(), weights.data() + K);
  double total = 0;
  for (double x : w) {
    if (!(x >= 0) || !std::isfinite(x)) throw std::invalid_argument("blend weights must be finite and >= 0");
    total += x;
  }
  if (total <= 0) throw std::invalid_argument("blend weights sum to zero");
  for (double& x : w) x /= total;
  py::array_t<int16_t> which(size);
  py::array_t<int64_t> within(size);
  int16_t* wh = which.mutable_data();
  int64_t* wi = within.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> count(K, 0);
    for (int64_t k = 0; k < size; ++k) {
      double best = -1e300;
      int64_t pick = 0;
      for (int64_t d = 0; d < K; ++d) {
        double deficit = w[d] * static_cast<double>(k + 1) - static_cast<double>(count[d]);
        if (deficit > best) {
          best = deficit;
          pick = d;
        }
      }
      wh[k] = static_cast<int16_t>(pick);
      wi[k] = count[pick]++;
    }
  }
  return py::make_tuple(which, within);
}

// ---------------------------------------------------------------------------------------------
// Gather: rows of tokens for a batch of (already shuffled) sample ids, as int64, without the GIL.
// `pointers` are the .idx byte offsets of each sequence in `tokens`.

template <typename Tok>
void gather_rows(const Tok* tokens, const int64_t* pointers, const int32_t* sizes, const IndexView& doc_idx,
                 const IndexView& sample_idx, const int64_t* samples, int64_t B, int64_t row_len, int64_t extra,
                 int64_t* out) {
  for (int64_t r = 0; r < B; ++r) {
    int64_t s = samples[r];
    int64_t d0 = sample_idx[2 * s], o0 = sample_idx[2 * s + 1];
    int64_t d1 = sample_idx[2 * s + 2], o1 = sample_idx[2 * s + 3];
    int64_t* dst = out + r * row_len;
    int64_t filled = 0;
    for (int64_t d = d0; d <= d1 && filled < row_len; ++d) {
      int64_t doc = doc_idx[d];
      int64_t begin = d == d0 ? o0 : 0;
      int64_t end = d == d1 ? o1 + extra : sizes[doc];
      end = std::min<int64_t>(end, sizes[doc]);
      int64_t n = std::min(end - begin, row_len - filled);
      const Tok* src = tokens + pointers[doc] / static_cast<int64_t>(sizeof(Tok)) + begin;
      for (int64_t i = 0; i < n; ++i) dst[filled + i] = static_cast<int64_t>(src[i]);
      filled += std::max<int64_t>(n, 0);
    }
    // Only a kept partial last sample is short; its tail is padded with -1 for the caller to mask.
    for (int64_t i = filled; i < row_len; ++i) dst[i] = -1;
  }
}

py::array gather_samples(py::array tokens, py::array_t<int64_t, py::array::c_style> pointers,
                         py::array_t<int32_t, py::array::c_style> sizes, py::array document_index,
                         py::array sample_index, py::array_t<int64_t, py::array::c_style | py::array::forcecast> samples,
                         int64_t seq_len, int64_t extra, py::object shuffle_index) {
  IndexView doc_idx(document_index, "document_index");
  IndexView sample_idx(sample_index, "sample_index");
  int64_t B = samples.size(), row_len = seq_len + extra;
  int64_t num_samples = sample_idx.n / 2 - 1;
  // Positions in the served order map to samples through the shuffle index, when one is given.
  std::vector<int64_t> mapped(static_cast<size_t>(B));
  const int64_t* pos = samples.data();
  if (!shuffle_index.is_none()) {
    py::array sh = shuffle_index.cast<py::array>();
    IndexView shuffle(sh, "shuffle_index");
    for (int64_t r = 0; r < B; ++r) {
      if (pos[r] < 0 || pos[r] >= shuffle.n)
        throw std::out_of_range("position " + std::to_string(pos[r]) + " outside [0, " + std::to_string(shuffle.n) + ")");
      mapped[r] = shuffle[pos[r]];
    }
  } else {
    std::copy(pos, pos + B, mapped.begin());
  }
  const int64_t* ids = mapped.data();
  for (int64_t r = 0; r < B; ++r)
    if (ids[r] < 0 || ids[r] >= num_samples)
      throw std::out_of_range("sample " + std::to_string(ids[r]) + " outside [0, " + std::to_string(num_samples) + ")");
  py::array_t<int64_t> out({B, row_len});
  int64_t* o = out.mutable_data();
  char kind = tokens.dtype().kind();
  size_t is = tokens.itemsize();
  const void* t = tokens.data();
  const int64_t* ep = pointers.data();
  const int32_t* sz = sizes.data();
  py::gil_scoped_release nogil;
  if (kind == 'u' && is == 2) gather_rows(static_cast<const uint16_t*>(t), ep, sz, doc_idx, sample_idx, ids, B, row_len, extra, o);
  else if (kind == 'i' && is == 4) gather_rows(static_cast<const int32_t*>(t), ep, sz, doc_idx, sample_idx, ids, B, row_len, extra, o);
  else if (kind == 'u' && is == 1) gather_rows(static_cast<const uint8_t*>(t), ep, sz, doc_idx, sample_idx, ids, B, row_len, extra, o);
  else if (kind == 'i' && is == 8) gather_rows(static_cast<const int64_t*>(t), ep, sz, doc_idx, sample_idx, ids, B, row_len, extra, o);
  else if (kind == 'i' && is == 2) gather_rows(static_cast<const int16_t*>(t), ep, sz, doc_idx, sample_idx, ids, B, row_len, extra, o);
  else if (kind == 'i' && is == 1) gather_rows(static_cast<const int8_t*>(t), ep, sz, doc_idx, sample_idx, ids, B, row_len, extra, o);
  else {
    py::gil_scoped_acquire gil;
    throw std::invalid_argument("token dtype must be an integer type");
  }
  return out;
}

}  // namespace

void register_data_helpers(py::module_& m) {
  m.def("build_document_index", &build_document_index, py::arg("documents"), py::arg("num_epochs"),
        py::arg("seed"), "Per-epoch shuffled document order (int32, or int64 for huge ids).");
  m.def("build_shuffle_index", &build_shuffle_index, py::arg("n"), py::arg("seed"),
        "A seeded permutation of arange(n): int32, or int64 past 2^31.");
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_index"), py::arg("seq_len"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last") = true,
        py::arg("add_extra_token") = 1, py::arg("num_threads") = 0,
        "[num_samples+1, 2] window boundaries (doc_idx position, offset), Megatron's layout.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset index int16, sample-within-dataset int64) for a smallest-error weighted mix.");
  m.def("gather_samples", &gather_samples, py::arg("tokens"), py::arg("pointers"), py::arg("sizes"),
        py::arg("document_index"), py::arg("sample_index"), py::arg("samples"), py::arg("seq_len"),
        py::arg("extra") = 1, py::arg("shuffle_index") = py::none(),
        "[B, seq_len+extra] int64 rows for the given sample ids (positions in shuffle_index if given).");
}
