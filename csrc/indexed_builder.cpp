// Streaming writer and merger for the MMIDIDX indexed dataset (.bin tokens + .idx index).
//
// The .idx layout (little endian), which Megatron's readers also understand:
//   "MMIDIDX\0\0" | u64 version=1 | u8 dtype code | u64 sequence count S | u64 document count D
//   | i32 sizes[S] | i64 byte pointers[S] | i64 document boundaries[D]  (first 0, last S)
//
// Memory stays flat however large the corpus: tokens go straight to the .bin, and the per-sequence
// sizes and per-document boundaries are spilled to side files in fixed-size blocks. The .idx is
// assembled from those side files at finalize. Every output is written under a temporary name and
// renamed into place only when complete, so a crash never leaves a half-written shard behind.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <memory>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;
constexpr size_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;
constexpr size_t kSpillEntries = 1 << 16;   // sizes/boundaries buffered before a spill
constexpr size_t kCopyBytes = 8 << 20;      // buffer for streaming file copies

// Megatron's dtype codes and their item sizes (0: unknown code).
size_t itemsize_of(int code) {
  switch (code) {
    case 1: case 2: return 1;   // uint8, int8
    case 3: case 8: return 2;   // int16, uint16
    case 4: case 7: return 4;   // int32, float32
    case 5: case 6: return 8;   // int64, float64
    default: return 0;
  }
}

struct File {
  FILE* f = nullptr;
  std::string path;
  File() = default;
  File(const std::string& p, const char* mode) : path(p) {
    f = std::fopen(p.c_str(), mode);
    if (!f) throw std::runtime_error(p + ": cannot open (" + std::strerror(errno) + ")");
    std::setvbuf(f, nullptr, _IOFBF, 1 << 20);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() { close(); }
  void write(const void* p, size_t n) {
    if (n && std::fwrite(p, 1, n, f) != n) throw std::runtime_error(path + ": write failed (disk full?)");
  }
  void read(void* p, size_t n) {
    if (n && std::fread(p, 1, n, f) != n) throw std::runtime_error(path + ": unexpected end of file");
  }
  void close() {
    if (f) {
      bool bad = std::fclose(f) != 0;
      f = nullptr;
      if (bad) throw std::runtime_error(path + ": close failed (disk full?)");
    }
  }
};

int64_t file_size(const std::string& path) {
  File f(path, "rb");
  ::fseeko(f.f, 0, SEEK_END);
  return static_cast<int64_t>(::ftello(f.f));
}

// Copies `n` bytes from `src` (current position) to `dst`.
void copy_bytes(File& src, File& dst, int64_t n, std::vector<char>& buf) {
  while (n > 0) {
    size_t chunk = static_cast<size_t>(std::min<int64_t>(n, static_cast<int64_t>(buf.size())));
    src.read(buf.data(), chunk);
    dst.write(buf.data(), chunk);
    n -= static_cast<int64_t>(chunk);
  }
}

struct IdxHeader {
  int dtype_code;
  uint64_t num_sequences;
  uint64_t num_documents;  // boundaries, including the leading 0
};

IdxHeader read_header(File& f) {
  char magic[9];
  f.read(magic, 9);
  if (std::memcmp(magic, kMagic, 9) != 0) throw std::runtime_error(f.path + ": bad magic, not an MMIDIDX index");
  uint64_t version;
  f.read(&version, 8);
  if (version != kVersion) throw std::runtime_error(f.path + ": unsupported version " + std::to_string(version));
  uint8_t code;
  f.read(&code, 1);
  if (!itemsize_of(code)) throw std::runtime_error(f.path + ": unknown dtype code " + std::to_string(code));
  IdxHeader h{code, 0, 0};
  f.read(&h.num_sequences, 8);
  f.read(&h.num_documents, 8);
  return h;
}

class IndexedBuilder {
 public:
  IndexedBuilder(const std::string& bin_path, const std::string& idx_path, int dtype_code)
      : bin_path_(bin_path), idx_path_(idx_path), code_(dtype_code), itemsize_(itemsize_of(dtype_code)) {
    if (!itemsize_) throw std::invalid_argument("unknown dtype code " + std::to_string(dtype_code));
    std::string tag = "." + std::to_string(::getpid()) + ".tmp";
    bin_tmp_ = bin_path + tag;
    idx_tmp_ = idx_path + tag;
    sizes_tmp_ = idx_path + ".sizes" + tag;
    docs_tmp_ = idx_path + ".docs" + tag;
    bin_.reset(new File(bin_tmp_, "wb"));
    sizes_file_.reset(new File(sizes_tmp_, "wb"));
    docs_file_.reset(new File(docs_tmp_, "wb"));
    sizes_.reserve(kSpillEntries);
    docs_.reserve(kSpillEntries);
  }

  ~IndexedBuilder() {
    if (!finalized_) abort_quietly();
  }

  // One sequence; `tokens` must already have the shard's dtype (checked by item size).
  void add_item(py::buffer tokens) {
    py::buffer_info info = tokens.request();
    check_buffer(info);
    {
      py::gil_scoped_release nogil;
      append_sequence(info.ptr, static_cast<int64_t>(info.size));
    }
  }

  void end_document() { push_boundary(num_sequences_); }

  // A batch of whole documents, one sequence each: `tokens` concatenated, `lengths` per document.
  void add_documents(py::buffer tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths) {
    py::buffer_info info = tokens.request();
    check_buffer(info);
    auto len = lengths.unchecked<1>();
    int64_t total = 0;
    for (py::ssize_t i = 0; i < len.shape(0); ++i) {
      if (len(i) < 0) throw std::invalid_argument("negative document length");
      total += len(i);
    }
    if (total != static_cast<int64_t>(info.size))
      throw std::invalid_argument("lengths sum to " + std::to_string(total) + " but " +
                                  std::to_string(info.size) + " tokens were given");
    py::gil_scoped_release nogil;
    const char* p = static_cast<const char*>(info.ptr);
    for (py::ssize_t i = 0; i < len.shape(0); ++i) {
      append_sequence(p, len(i));
      p += len(i) * itemsize_;
      push_boundary(num_sequences_);
    }
  }

  // Appends every document of another shard (same dtype), streaming: the merge of partial shards.
  void merge(const std::string& other_bin, const std::string& other_idx) {
    py::gil_scoped_release nogil;
    File idx(other_idx, "rb");
    IdxHeader h = read_header(idx);
    if (h.dtype_code != code_)
      throw std::runtime_error(other_idx + ": dtype code " + std::to_string(h.dtype_code) +
                               " differs from the output's " + std::to_string(code_));
    if (h.num_documents < 1) throw std::runtime_error(other_idx + ": no document boundaries");
    std::vector<char> buf(kCopyBytes);
    // Sizes: a block at a time, so the merge never holds a whole index.
    int64_t tokens = 0;
    std::vector<int32_t> block(kSpillEntries);
    for (uint64_t done = 0; done < h.num_sequences;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(kSpillEntries, h.num_sequences - done));
      idx.read(block.data(), n * 4);
      for (size_t i = 0; i < n; ++i) {
        tokens += block[i];
        sizes_.push_back(block[i]);
        if (sizes_.size() >= kSpillEntries) spill();
      }
      done += n;
    }
    // Skip the other shard's pointers; ours are recomputed from the sizes at finalize.
    ::fseeko(idx.f, static_cast<off_t>(h.num_sequences * 8), SEEK_CUR);
    int64_t first;
    idx.read(&first, 8);
    for (uint64_t i = 1; i < h.num_documents; ++i) {
      int64_t b;
      idx.read(&b, 8);
      push_boundary(num_sequences_ + b);
    }
    File bin(other_bin, "rb");
    int64_t want = tokens * static_cast<int64_t>(itemsize_);
    if (file_size(other_bin) != want)
      throw std::runtime_error(other_bin + ": holds " + std::to_string(file_size(other_bin)) +
                               " bytes but its index describes " + std::to_string(want));
    copy_bytes(bin, *bin_, want, buf);
    num_sequences_ += static_cast<int64_t>(h.num_sequences);
    num_tokens_ += tokens;
  }

  // Writes the .idx and renames both files into place; returns (documents, tokens).
  std::pair<int64_t, int64_t> finalize() {
    if (finalized_) throw std::runtime_error(idx_path_ + ": already finalized");
    py::gil_scoped_release nogil;
    // A trailing sequence not closed by end_document still belongs to a document.
    if (num_sequences_ != last_doc_) end_document();
    spill();
    bin_->close();
    sizes_file_->close();
    docs_file_->close();

    {
      File out(idx_tmp_, "wb");
      out.write(kMagic, 9);
      out.write(&kVersion, 8);
      uint8_t code = static_cast<uint8_t>(code_);
      out.write(&code, 1);
      uint64_t s = static_cast<uint64_t>(num_sequences_), d = static_cast<uint64_t>(num_documents_ + 1);
      out.write(&s, 8);
      out.write(&d, 8);
      std::vector<char> buf(kCopyBytes);
      {
        File sizes(sizes_tmp_, "rb");
        copy_bytes(sizes, out, num_sequences_ * 4, buf);
      }
      {
        // Pointers are the running byte offsets of the sizes, recomputed block by block.
        File sizes(sizes_tmp_, "rb");
        std::vector<int32_t> in(kSpillEntries);
        std::vector<int64_t> ptr(kSpillEntries);
        int64_t offset = 0;
        for (int64_t done = 0; done < num_sequences_;) {
          size_t n = static_cast<size_t>(std::min<int64_t>(kSpillEntries, num_sequences_ - done));
          sizes.read(in.data(), n * 4);
          for (size_t i = 0; i < n; ++i) {
            ptr[i] = offset;
            offset += static_cast<int64_t>(in[i]) * static_cast<int64_t>(itemsize_);
          }
          out.write(ptr.data(), n * 8);
          done += static_cast<int64_t>(n);
        }
      }
      int64_t zero = 0;
      out.write(&zero, 8);
      File docs(docs_tmp_, "rb");
      copy_bytes(docs, out, num_documents_ * 8, buf);
      std::fflush(out.f);
      ::fsync(::fileno(out.f));
    }
    if (std::rename(bin_tmp_.c_str(), bin_path_.c_str()) != 0)
      throw std::runtime_error(bin_path_ + ": rename failed (" + std::strerror(errno) + ")");
    if (std::rename(idx_tmp_.c_str(), idx_path_.c_str()) != 0)
      throw std::runtime_error(idx_path_ + ": rename failed (" + std::strerror(errno) + ")");
    std::remove(sizes_tmp_.c_str());
    std::remove(docs_tmp_.c_str());
    finalized_ = true;
    return {num_documents_, num_tokens_};
  }

  // Drops the partial output (used when preprocessing or finalize fails half-way).
  void abort_quietly() {
    try {
      if (bin_) bin_->close();
      if (sizes_file_) sizes_file_->close();
      if (docs_file_) docs_file_->close();
    } catch (...) {
    }
    std::remove(bin_tmp_.c_str());
    std::remove(idx_tmp_.c_str());  // present when finalize failed while writing the .idx
    std::remove(sizes_tmp_.c_str());
    std::remove(docs_tmp_.c_str());
    finalized_ = true;
  }

  int64_t num_documents() const { return num_documents_; }
  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_tokens() const { return num_tokens_; }

 private:
  void check_buffer(const py::buffer_info& info) const {
    if (finalized_) throw std::runtime_error(idx_path_ + ": writer already finalized");
    if (info.ndim != 1) throw std::invalid_argument("tokens must be a 1-D array");
    if (static_cast<size_t>(info.itemsize) != itemsize_)
      throw std::invalid_argument("token item size " + std::to_string(info.itemsize) +
                                  " does not match the shard dtype's " + std::to_string(itemsize_));
    if (info.strides[0] != info.itemsize) throw std::invalid_argument("tokens must be contiguous");
  }

  void append_sequence(const void* p, int64_t n) {
    if (n > INT32_MAX) throw std::invalid_argument("a sequence longer than 2^31-1 tokens");
    bin_->write(p, static_cast<size_t>(n) * itemsize_);
    sizes_.push_back(static_cast<int32_t>(n));
    ++num_sequences_;
    num_tokens_ += n;
    if (sizes_.size() >= kSpillEntries) spill();
  }

  void push_boundary(int64_t b) {
    docs_.push_back(b);
    last_doc_ = b;
    ++num_documents_;
    if (docs_.size() >= kSpillEntries) spill();
  }

  void spill() {
    sizes_file_->write(sizes_.data(), sizes_.size() * 4);
    sizes_.clear();
    docs_file_->write(docs_.data(), docs_.size() * 8);
    docs_.clear();
  }

  // last_doc_: the latest document boundary, kept apart from docs_ because docs_ is spilled.
  std::string bin_path_, idx_path_, bin_tmp_, idx_tmp_, sizes_tmp_, docs_tmp_;
  int code_;
  size_t itemsize_;
  std::unique_ptr<File> bin_, sizes_file_, docs_file_;
  std::vector<int32_t> sizes_;
  std::vector<int64_t> docs_;
  int64_t num_sequences_ = 0, num_documents_ = 0, num_tokens_ = 0, last_doc_ = 0;
  bool finalized_ = false;
};

}  // namespace

void register_indexed_builder(py::module_& m) {
  py::class_<IndexedBuilder>(m, "IndexedBuilder",
                             "Streaming MMIDIDX writer: tokens to .bin as they come, the .idx at finalize.")
      .def(py::init<const std::string&, const std::string&, int>(), py::arg("bin_path"), py::arg("idx_path"),
           py::arg("dtype_code"))
      .def("add_item", &IndexedBuilder::add_item, py::arg("tokens"))
      .def("end_document", &IndexedBuilder::end_document)
      .def("add_documents", &IndexedBuilder::add_documents, py::arg("tokens"), py::arg("lengths"))
      .def("merge", &IndexedBuilder::merge, py::arg("bin_path"), py::arg("idx_path"))
      .def("finalize", &IndexedBuilder::finalize)
      .def("abort", &IndexedBuilder::abort_quietly)
      .def_property_readonly("num_documents", &IndexedBuilder::num_documents)
      .def_property_readonly("num_sequences", &IndexedBuilder::num_sequences)
      .def_property_readonly("num_tokens", &IndexedBuilder::num_tokens);
  m.attr("IDX_HEADER_BYTES") = kHeaderBytes;
}
