// dino/io/atomic_file.hpp: write a file so that readers find the old content or the new, never half.
//
// atomic_file creates "<path>.tmp.<pid>.<n>" next to the target (same directory, hence the same
// file system, so that rename(2) replaces the target in one step), takes writes, and commit()
// fsyncs and closes it, renames it over the target and fsyncs the directory so that the rename
// itself survives a crash. Destroying an atomic_file without commit() (an exception while the
// content was produced) removes the temporary file and leaves the target as it was.
// The new file gets mode 0666 minus the umask (the old file's mode is not carried over); a
// symbolic link at the target is replaced, not followed. POSIX only.
// Every failure throws io_error naming the target path and the system's reason.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include <fcntl.h>
#include <unistd.h>

#include "dino/core/error.hpp"

namespace dino::io {

class atomic_file {
 public:
  /// Creates the temporary file next to `path`; throws io_error if that is impossible
  /// (missing directory, no permission).
  explicit atomic_file(std::string path) : path_(std::move(path)) {
    static std::atomic<unsigned> counter{0};
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
      temp_ = path_ + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
      fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ < 0 && errno != EEXIST) fail("cannot create the temporary file '" + temp_ + "'", false);
    }
    if (fd_ < 0) fail("cannot find a free temporary file name next to it", false);
  }
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() { discard(); }

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_; }

  /// Appends n bytes.
  void write(const void* data, std::size_t n) {
    require<io_error>(fd_ >= 0, "atomic_file: '", path_, "': write after commit or discard");
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      ::ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("cannot write the temporary file '" + temp_ + "'", true);
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  void write(std::span<const std::byte> bytes) { write(bytes.data(), bytes.size()); }

  /// Makes the written content durable and puts it in place of the target.
  void commit() {
    require<io_error>(fd_ >= 0, "atomic_file: '", path_, "': commit after commit or discard");
    if (::fsync(fd_) != 0) fail("cannot flush the temporary file '" + temp_ + "' to disk", true);
    int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("cannot close the temporary file '" + temp_ + "'", true);
    if (::rename(temp_.c_str(), path_.c_str()) != 0) fail("cannot rename '" + temp_ + "' over it", true);
    temp_.clear();
    sync_directory();
  }

  /// Removes the temporary file; the target is untouched. Called by the destructor.
  void discard() noexcept {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    if (!temp_.empty()) ::unlink(temp_.c_str());
    temp_.clear();
  }

 private:
  [[noreturn]] void fail(const std::string& what, bool remove_temp) {
    int err = errno;
    if (remove_temp) discard();
    throw io_error("atomic write of '" + path_ + "': " + what + ": " + std::strerror(err));
  }
  // Best effort: some file systems do not support fsync on a directory; the data is safe anyway.
  void sync_directory() const noexcept {
    std::string::size_type slash = path_.rfind('/');
    std::string dir = slash == std::string::npos ? std::string(".") : path_.substr(0, slash == 0 ? 1 : slash);
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

  std::string path_;
  std::string temp_;
  int fd_ = -1;
};

/// Writes `bytes` to `path` atomically (see atomic_file).
inline void write_file_atomic(const std::string& path, std::span<const std::byte> bytes) {
  atomic_file f(path);
  f.write(bytes);
  f.commit();
}
/// The same for text.
inline void write_file_atomic(const std::string& path, std::string_view text) {
  write_file_atomic(path, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

}  // namespace dino::io
