#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A test seam: with `QBACKUP_CRASH_AFTER=N` in the environment, the process
/// kills itself (SIGKILL) just before the Nth file write or fsync, so tests can
/// enumerate every crash point of a real command. Unset, it costs one branch.
public final class CrashSeam: @unchecked Sendable {
    public static let shared = CrashSeam()

    private var configured = false
    private var limit: Int = 0
    private var count: Int = 0

    func configureFromEnvironment() {
        if configured { return }
        configured = true
        if let value = getenv("QBACKUP_CRASH_AFTER"), let n = Int(String(cString: value)), n > 0 {
            limit = n
        }
    }

    /// How many writes and syncs the process has made so far (counted only while the seam is armed).
    public var operations: Int { count }

    func beforeWrite() throws { tick() }
    func beforeSync() throws { tick() }

    private func tick() {
        guard limit > 0 else { return }
        count += 1
        if count >= limit {
            kill(getpid(), SIGKILL)
        }
    }
}
