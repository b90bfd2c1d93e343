// A word -> token-ids cache for tokenizers whose output is the concatenation of per-word outputs
// (SentencePiece with whitespace splitting; see megalite/data/tokenizer.py for when that holds).
//
// Per batch: prepare(texts) splits every text into words (a run of spaces plus the non-space bytes
// after it, with one space standing for the dummy prefix in front of the text) and returns the
// distinct words the cache lacks; the caller encodes those in one batched tokenizer call and hands
// the ids to fill(); assemble() then writes the batch's flat token array and per-text lengths.
// Everything between the Python calls is byte work in C++: no per-word Python objects for hits.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL ^ n;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    h = (h ^ v) * 0x100000001b3ULL;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001b3ULL;
  h ^= h >> 32;
  return h * 0x9E3779B97F4A7C15ULL;
}

class WordCache {
 public:
  WordCache(std::vector<int32_t> space_ids, size_t max_entries)
      : space_ids_(std::move(space_ids)), max_entries_(max_entries) {
    reset();
  }

  // Returns the distinct uncached words of `texts`, each without its first space.
  py::list prepare(const py::list& texts) {
    // A batch whose ids never arrived (the tokenizer failed) would leave empty entries: start over.
    if (count_ >= max_entries_ || !pending_.empty()) reset();
    texts_ = texts;  // keeps the UTF-8 buffers referenced below alive until assemble()
    words_.clear();
    text_words_.assign(texts.size() + 1, 0);
    pending_.clear();
    py::list missing;
    for (size_t t = 0; t < texts.size(); ++t) {
      PyObject* obj = texts[t].ptr();
      if (!PyUnicode_Check(obj)) throw std::invalid_argument("WordCache.prepare: texts must be str");
      Py_ssize_t n = 0;
      const char* s = PyUnicode_AsUTF8AndSize(obj, &n);
      if (!s) throw py::error_already_set();
      if (n > 0) {
        // Word k is s[start, i): the space before it (the dummy prefix for the first word, else the
        // space that ended the previous word) is implied; a run of further spaces stays in it.
        Py_ssize_t start = 0;
        while (true) {
          Py_ssize_t i = start;
          while (i < n && s[i] == ' ') ++i;
          while (i < n && s[i] != ' ') ++i;
          add_word(s, start, i, missing);
          if (i >= n) break;
          start = i + 1;
        }
      }
      text_words_[t + 1] = words_.size();
    }
    return missing;
  }

  // Ids for the words prepare() returned, in the same order.
  void fill(const py::list& ids) {
    if (ids.size() != pending_.size())
      throw std::invalid_argument("WordCache.fill: expected " + std::to_string(pending_.size()) + " id lists");
    for (size_t k = 0; k < pending_.size(); ++k) {
      Entry& e = table_[pending_[k]];
      e.id_off = static_cast<uint32_t>(ids_.size());
      PyObject* lst = ids[k].ptr();
      py::sequence seq = py::reinterpret_borrow<py::sequence>(lst);
      for (auto v : seq) ids_.push_back(v.cast<int32_t>());
      e.id_len = static_cast<uint32_t>(ids_.size() - e.id_off);
    }
    pending_.clear();
  }

  // (flat ids as `dtype`, int64 lengths per text) for the prepared batch.
  py::tuple assemble(const py::dtype& dtype) {
    if (!pending_.empty()) throw std::runtime_error("WordCache.assemble: fill() was not called");
    size_t T = text_words_.size() - 1;
    py::array_t<int64_t> lengths(T);
    int64_t* L = lengths.mutable_data();
    int64_t total = 0;
    for (size_t t = 0; t < T; ++t) {
      int64_t n = 0;
      for (size_t w = text_words_[t]; w < text_words_[t + 1]; ++w) n += length_of(words_[w]);
      L[t] = n;
      total += n;
    }
    py::array out(dtype, std::vector<py::ssize_t>{static_cast<py::ssize_t>(total)});
    char kind = dtype.kind();
    size_t item = dtype.itemsize();
    if (kind == 'u' && item == 2) copy_ids(static_cast<uint16_t*>(out.mutable_data()));
    else if (kind == 'i' && item == 4) copy_ids(static_cast<int32_t*>(out.mutable_data()));
    else if (kind == 'i' && item == 8) copy_ids(static_cast<int64_t*>(out.mutable_data()));
    else throw std::invalid_argument("WordCache.assemble: dtype must be uint16, int32 or int64");
    texts_ = py::list();
    return py::make_tuple(out, lengths);
  }

  size_t size() const { return count_; }

 private:
  struct Entry {
    uint64_t hash = 0;
    uint32_t key_off = 0, key_len = UINT32_MAX;  // key_len UINT32_MAX: empty slot
    uint32_t id_off = 0, id_len = 0;
  };
  // A word of the batch: a table slot, or -1 for the lone trailing space.
  using WordRef = int64_t;

  void reset() {
    table_.assign(1 << 16, Entry());
    keys_.clear();
    ids_.clear();
    pending_.clear();
    words_.clear();
    count_ = 0;
  }

  size_t length_of(WordRef w) const { return w < 0 ? space_ids_.size() : table_[w].id_len; }

  template <typename T>
  void copy_ids(T* dst) const {
    for (WordRef w : words_) {
      if (w < 0) {
        for (int32_t v : space_ids_) *dst++ = static_cast<T>(v);
      } else {
        const Entry& e = table_[w];
        const int32_t* src = ids_.data() + e.id_off;
        for (uint32_t i = 0; i < e.id_len; ++i) *dst++ = static_cast<T>(src[i]);
      }
    }
  }

  // The word is s[start, end) with one (implicit) space before it; its key includes that space
  // so "x" at the text start and " x" later are the same word, as they are to the tokenizer.
  void add_word(const char* s, Py_ssize_t start, Py_ssize_t end, py::list& missing) {
    const char* p = s + start;
    size_t n = static_cast<size_t>(end - start);
    if (n == 0) {  // a lone space: empty input would get no dummy prefix, so it has fixed ids
      words_.push_back(-1);
      return;
    }
    uint64_t h = hash_bytes(p, n);
    size_t mask = table_.size() - 1;
    size_t i = h & mask;
    while (table_[i].key_len != UINT32_MAX) {
      const Entry& e = table_[i];
      if (e.hash == h && e.key_len == n && std::memcmp(keys_.data() + e.key_off, p, n) == 0) {
        words_.push_back(static_cast<WordRef>(i));
        return;
      }
      i = (i + 1) & mask;
    }
    Entry& e = table_[i];
    e.hash = h;
    e.key_off = static_cast<uint32_t>(keys_.size());
    e.key_len = static_cast<uint32_t>(n);
    keys_.insert(keys_.end(), p, p + n);
    pending_.push_back(i);
    words_.push_back(static_cast<WordRef>(i));
    missing.append(py::reinterpret_steal<py::str>(PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(n), "strict")));
    if (++count_ * 2 > table_.size()) grow();
  }

  void grow() {
    std::vector<Entry> old;
    old.swap(table_);
    table_.assign(old.size() * 2, Entry());
    size_t mask = table_.size() - 1;
    std::vector<size_t> moved(old.size(), SIZE_MAX);
    for (size_t j = 0; j < old.size(); ++j) {
      if (old[j].key_len == UINT32_MAX) continue;
      size_t i = old[j].hash & mask;
      while (table_[i].key_len != UINT32_MAX) i = (i + 1) & mask;
      table_[i] = old[j];
      moved[j] = i;
    }
    for (WordRef& w : words_)
      if (w >= 0) w = static_cast<WordRef>(moved[static_cast<size_t>(w)]);
    for (size_t& p : pending_) p = moved[p];
  }

  std::vector<int32_t> space_ids_;
  size_t max_entries_;
  std::vector<Entry> table_;
  std::vector<char> keys_;
  std::vector<int32_t> ids_;
  size_t count_ = 0;
  py::list texts_;
  std::vector<WordRef> words_;
  std::vector<size_t> text_words_;
  std::vector<size_t> pending_;
};

}  // namespace

void register_word_cache(py::module_& m) {
  py::class_<WordCache>(m, "WordCache", "Word -> ids cache that assembles flat token arrays in C++.")
      .def(py::init<std::vector<int32_t>, size_t>(), py::arg("space_ids"), py::arg("max_entries") = 2000000)
      .def("prepare", &WordCache::prepare, py::arg("texts"))
      .def("fill", &WordCache::fill, py::arg("ids"))
      .def("assemble", &WordCache::assemble, py::arg("dtype"))
      .def_property_readonly("size", &WordCache::size);
}
