// tools/cli.hpp: the command-line parsing shared by the dino tools: --name value flags,
// each declared with its default and help text, so that --help lists every flag.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <sstream>
#include <string>
#include <cmath>
#include <vector>

namespace dino_cli {

struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// "a,b,c" as finite numbers; usage_error naming --flag otherwise.
inline std::vector<double> number_list(const std::string& flag, const std::string& s) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ',')) {
    char* end = nullptr;
    const double x = std::strtod(t.c_str(), &end);
    if (t.empty() || !end || *end || !std::isfinite(x))
      throw usage_error("--" + flag + " must be comma-separated numbers, got '" + s + "'");
    v.push_back(x);
  }
  if (v.empty()) throw usage_error("--" + flag + " is empty");
  return v;
}

class flags {
 public:
  flags(std::string program, std::string synopsis) : program_(std::move(program)), synopsis_(std::move(synopsis)) {}

  /// Declares a flag with its default ("" = none) and help.
  flags& add(const std::string& name, const std::string& def, const std::string& help) {
    order_.push_back(name);
    decl_[name] = {def, help};
    return *this;
  }
  /// Parses argv from `first`; returns false when --help was asked (help already printed).
  bool parse(int argc, char** argv, int first = 1) {
    for (int i = first; i < argc; ++i) {
      std::string k = argv[i];
      if (k == "-h" || k == "--help") {
        help(stdout);
        return false;
      }
      if (k.rfind("--", 0) != 0) throw usage_error("unexpected argument '" + k + "'");
      k = k.substr(2);
      std::string v;
      if (auto eq = k.find('='); eq != std::string::npos) {
        v = k.substr(eq + 1);
        k = k.substr(0, eq);
      } else if (decl_.count(k) && decl_[k].def == "false") {
        v = "true";  // a boolean switch
      } else {
        if (i + 1 >= argc) throw usage_error("--" + k + " needs a value");
        v = argv[++i];
      }
      if (!decl_.count(k)) throw usage_error("unknown option --" + k);
      given_[k] = v;
    }
    return true;
  }
  bool has(const std::string& k) const { return given_.count(k) != 0; }
  std::string str(const std::string& k) const {
    auto it = given_.find(k);
    return it != given_.end() ? it->second : decl_.at(k).def;
  }
  double num(const std::string& k) const {
    const std::string s = str(k);
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || !end || *end) throw usage_error("--" + k + " must be a number, got '" + s + "'");
    return v;
  }
  long integer(const std::string& k, long min = 0) const {
    const std::string s = str(k);
    char* end = nullptr;
    const long v = std::strtol(s.c_str(), &end, 10);
    if (s.empty() || !end || *end || v < min)
      throw usage_error("--" + k + " must be an integer >= " + std::to_string(min) + ", got '" + s + "'");
    return v;
  }
  bool boolean(const std::string& k) const {
    const std::string s = str(k);
    if (s == "true" || s == "1" || s == "yes") return true;
    if (s == "false" || s == "0" || s == "no") return false;
    throw usage_error("--" + k + " must be true or false, got '" + s + "'");
  }
  void help(std::FILE* f) const {
    std::fprintf(f, "usage: %s %s\n\n", program_.c_str(), synopsis_.c_str());
    for (const auto& n : order_) {
      const auto& d = decl_.at(n);
      std::fprintf(f, "  --%-28s %s%s%s%s\n", n.c_str(), d.help.c_str(), d.def.empty() ? "" : " [default: ",
                   d.def.c_str(), d.def.empty() ? "" : "]");
    }
  }
  const std::string& program() const { return program_; }

 private:
  struct decl {
    std::string def, help;
  };
  std::string program_, synopsis_;
  std::vector<std::string> order_;
  std::map<std::string, decl> decl_;
  std::map<std::string, std::string> given_;
};

}  // namespace dino_cli
