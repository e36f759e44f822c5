import FoundationEssentials
import QCowImage

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
                let who = LockHolder.of(descriptor: fd).map(\.description) ?? "another qbackup process"
                let waited = wait > 0 ? " (waited \(wait) s)" : ""
                throw ChainError(.locked, "the repository is locked by \(who)\(waited); try again later", path: path)
            }
            usleep(50_000)
        }
    }
}
