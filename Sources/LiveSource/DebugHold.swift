#if DEBUG
import FoundationEssentials
import Glibc

/// Tests only (debug builds): holds a live backup's point-in-time window open, once the
/// export is up and before the first read, so a test can write to the guest, fault QEMU or
/// restart libvirtd while the backup is in flight.
///
/// `QBACKUP_DEBUG_LIVE_HOLD=PATH` waits until PATH exists (the test creates it when it is
/// done; at most two minutes), so the window does not depend on how fast the machine is.
/// `QBACKUP_DEBUG_LIVE_PAUSE=SECONDS` sleeps that long: for tests that strike at seeded
/// moments of a short window.
enum DebugHold {
    /// `QBACKUP_DEBUG_LIBVIRT_WRITTEN_HOLD=PATH`: a libvirt run, once every disk's layer is
    /// written and before it checks the job and records them, creates PATH.reached and waits
    /// until PATH exists (at most two minutes).
    static func written() {
        guard let path = ProcessInfo.processInfo.environment["QBACKUP_DEBUG_LIBVIRT_WRITTEN_HOLD"] else { return }
        FileManager.default.createFile(atPath: path + ".reached", contents: nil)
        waitUntilExists(path)
    }

    /// Waits until `path` exists, at most two minutes.
    private static func waitUntilExists(_ path: String) {
        let deadline = Date().addingTimeInterval(120)
        while access(path, F_OK) != 0 && Date() < deadline { usleep(10_000) }
    }

    static func here() {
        let environment = ProcessInfo.processInfo.environment
        if let path = environment["QBACKUP_DEBUG_LIVE_HOLD"] {
            waitUntilExists(path)
        } else if let pause = environment["QBACKUP_DEBUG_LIVE_PAUSE"], let seconds = Double(pause) {
            usleep(UInt32(seconds * 1_000_000))
        }
    }
}
#endif
