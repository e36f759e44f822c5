import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The repository lock: flock(2) on `DIR/.qbackup.lock`, exclusive for changes (backup,
/// merge), shared for reading (list, restore, verify). A refusal names the process that
/// holds it when /proc/locks tells.
enum RepositoryLock {
    /// Takes the lock on `fd`, retrying every 50 ms for up to `wait` seconds.
    static func take(_ fd: Int32, exclusive: Bool, wait: Double, path: String) throws {
        let deadline = Date().addingTimeInterval(max(0, wait))
        while flock(fd, (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 {
            let err = errno
            guard err == EWOULDBLOCK || err == EINTR else {
                throw ChainError(.io, "cannot lock the repository: \(String(cString: strerror(err)))", path: path)
            }
            if Date() >= deadline {
                let who = holder(of: fd).map { "\($0.command) (pid \($0.pid))" } ?? "another qbackup process"
                let waited = wait > 0 ? " (waited \(wait) s)" : ""
                throw ChainError(.locked, "the repository is locked by \(who)\(waited); try again later", path: path)
            }
            usleep(50_000)
        }
    }

    /// The first process /proc/locks lists as holding a flock on the file of `fd`.
    static func holder(of fd: Int32) -> (pid: Int32, command: String)? {
        var st = stat()
        guard fstat(fd, &st) == 0, let table = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return nil }
        // Linux's dev_t encoding (major 12 bits + 20, minor 8 + 24), as /proc/locks prints it: MAJ:MIN:INODE in hex, hex, decimal.
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        let file = String(format: "%02llx:%02llx:%llu", major, minor, UInt64(st.st_ino))
        for line in table.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the number.
            guard fields.count >= 6, fields[1] == "FLOCK", fields[5] == file, let pid = Int32(fields[4]), pid > 0,
                  pid != getpid() else { continue }
            let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines)
            return (pid, comm.flatMap { $0.isEmpty ? nil : $0 } ?? "a process")
        }
        return nil
    }
}
