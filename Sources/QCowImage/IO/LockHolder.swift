import FoundationEssentials

#if canImport(Glibc)
import Glibc
#endif

/// Which other process holds a lock on a file, as Linux tells in /proc: the one
/// lookup behind every "locked" error (the repository's flock, QEMU's image locks).
/// flock and POSIX locks name their process in /proc/locks; QEMU's open file
/// description (OFD) locks show pid -1 there, so their holder is found by the
/// `lock:` lines of /proc/PID/fdinfo. Nil when /proc does not tell (not Linux,
/// or another user's process).
public struct LockHolder: Sendable, CustomStringConvertible {
    public var pid: Int32
    /// The program's name (argv[0]'s last component, else /proc/PID/comm).
    public var command: String

    /// "qemu-nbd (pid 1234)"; a VM says so: "a VM (qemu-system-x86_64, pid 1234)".
    public var description: String {
        command.hasPrefix("qemu-system") ? "a VM (\(command), pid \(pid))" : "\(command) (pid \(pid))"
    }

    /// The first process other than this one that holds a lock on the file open as `fd`
    /// (covering `byte`, when given).
    public static func of(descriptor fd: Int32, byte: Int64? = nil) -> LockHolder? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return find(st, byte: byte)
    }

    /// The first process other than this one that holds a lock on the file at `path`
    /// (covering `byte`, when given).
    public static func of(path: String, byte: Int64? = nil) -> LockHolder? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return find(st, byte: byte)
    }

    static func find(_ st: stat, byte: Int64?) -> LockHolder? {
        guard let table = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return nil }
        // Linux's dev_t encoding (major 12 bits + 20, minor 8 + 24), as /proc prints it: MAJ:MIN:INODE in hex, hex, decimal.
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        let file = String(printf: "%02llx:%02llx:%llu", major, minor, UInt64(st.st_ino))
        var openFileLocks = false
        for line in table.split(separator: "\n") {
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the number.
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 8, fields[1] != "->", fields[5] == file, covers(fields[6], fields[7], byte) else { continue }
            if fields[4] == "-1" { openFileLocks = true }
            if let pid = Int32(fields[4]), pid > 0, pid != getpid() { return holder(pid) }
        }
        return openFileLocks ? fdinfoHolder(file, byte: byte) : nil
    }

    /// Whether the range START..END ("EOF": to the end) of a lock line covers `byte` (any byte when nil).
    static func covers(_ start: Substring, _ end: Substring, _ byte: Int64?) -> Bool {
        guard let byte else { return true }
        guard let first = Int64(start), first <= byte else { return false }
        return end == "EOF" || (Int64(end).map { byte <= $0 } ?? false)
    }

    /// The first other process with a `lock:` line on `file` in one of its /proc/PID/fdinfo entries.
    static func fdinfoHolder(_ file: String, byte: Int64?) -> LockHolder? {
        guard let pids = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return nil }
        let me = getpid()
        for name in pids {
            guard let pid = Int32(name), pid > 0, pid != me,
                  let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fdinfo") else { continue }
            for fd in fds {
                guard let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8) else { continue }
                // "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:5678 100 101"
                for line in info.split(separator: "\n") where line.hasPrefix("lock:") {
                    let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                    if fields.count >= 8, fields[5] == file, covers(fields[6], fields[7], byte) { return holder(pid) }
                }
            }
        }
        return nil
    }

    static func holder(_ pid: Int32) -> LockHolder {
        let argv0 = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline")))
            .flatMap { $0.split(separator: 0, omittingEmptySubsequences: false).first }
            .flatMap { String(data: Data($0), encoding: .utf8) }
            .flatMap { $0.split(separator: "/").last.map(String.init) }
        let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8))?
            .split(separator: "\n").first.map(String.init)
        let name = [argv0, comm].compactMap { $0 }.first { !$0.isEmpty } ?? "a process"
        return LockHolder(pid: pid, command: name)
    }
}
