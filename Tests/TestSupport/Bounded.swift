import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Running a child under a memory and time bound, for hostile-input tests.
public enum Bounded {
    /// The sanitizer this test process (and so the qbackup binary built with it) runs under, if any.
    public static let sanitizer: String? = {
        guard let handle = dlopen(nil, RTLD_NOW) else { return nil }
        if dlsym(handle, "__asan_init") != nil { return "address" }
        if dlsym(handle, "__tsan_init") != nil { return "thread" }
        return nil
    }()

    /// A shell command that runs `arguments` with at most `mebibytes` of memory and
    /// `seconds` of wall time. Normally `ulimit -v`; a sanitized binary reserves
    /// terabytes of shadow address space, so there the sanitizer's own limits
    /// (resident memory and single allocation size) bound it instead.
    public static func shellCommand(_ arguments: [String], mebibytes: Int, seconds: Int) -> String {
        let quoted = arguments.map { "'\($0)'" }.joined(separator: " ")
        let limit: String
        switch sanitizer {
        case "address":
            limit = "export ASAN_OPTIONS=\"${ASAN_OPTIONS:+$ASAN_OPTIONS:}hard_rss_limit_mb=\(mebibytes):max_allocation_size_mb=\(mebibytes)\""
        case "thread":
            limit = "export TSAN_OPTIONS=\"${TSAN_OPTIONS:+$TSAN_OPTIONS:}hard_rss_limit_mb=\(mebibytes):max_allocation_size_mb=\(mebibytes)\""
        default:
            limit = "ulimit -v \(mebibytes * 1024)"
        }
        return "\(limit); exec timeout -k 5 \(seconds) \(quoted)"
    }

    /// Runs `arguments` under `shellCommand`'s bounds.
    public static func run(_ arguments: [String], mebibytes: Int, seconds: Int) throws -> Tools.Result {
        try Tools.run("/bin/bash", ["-c", shellCommand(arguments, mebibytes: mebibytes, seconds: seconds)])
    }
}
