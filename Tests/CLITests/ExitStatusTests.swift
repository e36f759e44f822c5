import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Exit status 75 (busy): a repository locked by another process, or an image QEMU holds,
/// with real second processes holding the locks (flock(1), a running qbackup, qemu-nbd).
@Suite struct ExitStatusTests {
    static let busy: Int32 = 75

    /// A disk and a repository with one backup.
    static func repository(_ dir: TempDir, size: String = "16M") throws -> (disk: String, repo: String) {
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, size)
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 7 0 1M"])
        let result = try QBackupBinary.run(["backup", disk, "--repo", repo])
        #expect(result.status == 0, "\(result.stderr)")
        return (disk, repo)
    }

    /// `flock -x -o DIR/.qbackup.lock cat` in the background: flock(1) holds the repository
    /// lock until `release` closes cat's input (no signal, nothing left running).
    final class LockHolder {
        let process = Process()
        let input = Pipe()
        var pid: Int32 { process.processIdentifier }

        init(_ repo: String) throws {
            process.executableURL = URL(fileURLWithPath: try Tools.which("flock"))
            process.arguments = ["-x", "-o", repo + "/.qbackup.lock", "cat"]
            process.standardInput = input
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            // Held once a non-waiting reader is refused.
            let deadline = Date().addingTimeInterval(5)
            while try QBackupBinary.run(["list", repo, "--wait", "0"]).status != ExitStatusTests.busy && Date() < deadline {
                usleep(10_000)
            }
        }

        func release() {
            try? input.fileHandleForWriting.close()
            process.waitUntilExit()
        }

        /// Releases the lock after `seconds`, from a thread of its own: a block on Dispatch's
        /// global queue waited behind the suite's blocked pipe readers (2 cores) for more than
        /// the 5 s that list and verify wait, and the test failed in CI.
        func release(after seconds: Double) {
            let input = input
            Thread {
                Thread.sleep(forTimeInterval: seconds)
                try? input.fileHandleForWriting.close()
            }.start()
        }

        deinit { release() }
    }

    @Test func aLockedRepositoryIsBusyAndNamesTheHolder() throws {
        let dir = TempDir("qbackup-busy")
        let (disk, repo) = try Self.repository(dir)
        let holder = try LockHolder(repo)
        defer { holder.release() }
        let pid = holder.pid
        for args in [["backup", disk, "--repo", repo], ["merge", repo, "--keep", "1"], ["list", repo, "--wait", "0"],
                     ["verify", repo, "--wait", "0"]] {
            let result = try QBackupBinary.run(args)
            #expect(result.status == Self.busy, "\(args[0]): exit \(result.status) \(result.stderr)")
            #expect(result.stderr.hasPrefix("qbackup: error:") && result.stderr.split(separator: "\n").count == 1)
            #expect(result.stderr.contains("flock (pid \(pid))"), "\(args[0]): \(result.stderr)")
        }
    }

    /// list and verify wait for the lock (a few seconds by default, `--wait SECONDS`).
    @Test func listAndVerifyWaitForTheLock() throws {
        let dir = TempDir("qbackup-wait")
        let (_, repo) = try Self.repository(dir)
        for command in ["list", "verify"] {
            let holder = try LockHolder(repo)
            holder.release(after: 1)
            let started = Date()
            let result = try QBackupBinary.run([command, repo])
            let waited = Date().timeIntervalSince(started)
            holder.release()
            #expect(result.status == 0, "\(command) did not wait for the lock: \(result.stderr)")
            #expect(waited > 0.3, "\(command) returned after \(waited) s, before the lock was free")
            let short = try LockHolder(repo)
            let refused = try QBackupBinary.run([command, repo, "--wait", "0.5"])
            short.release()
            #expect(refused.status == Self.busy && refused.stderr.contains("waited 0.5 s"), "\(refused.stderr)")
        }
    }

    /// A running qbackup (backup of a bigger disk, stopped while it holds the lock) makes merge busy.
    @Test func aRunningQbackupMakesMergeBusy() throws {
        let dir = TempDir("qbackup-busy-run")
        let (disk, repo) = try Self.repository(dir, size: "512M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 9 0 400M"])
        let backup = Process()
        backup.executableURL = URL(fileURLWithPath: try QBackupBinary.path())
        backup.arguments = ["backup", disk, "--repo", repo]
        backup.standardOutput = FileHandle.nullDevice
        backup.standardError = FileHandle.nullDevice
        try backup.run()
        // Watched in /proc/locks: a reader taking the lock meanwhile would make the backup itself busy.
        func holdsFlock(_ pid: Int32) -> Bool {
            let table = (try? String(contentsOfFile: "/proc/locks", encoding: .utf8)) ?? ""
            return table.split(separator: "\n").contains { line in
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                return f.count > 4 && f[1] == "FLOCK" && f[4] == "\(pid)"
            }
        }
        var held = false
        while backup.isRunning && !held {
            held = holdsFlock(backup.processIdentifier)
            if !held { usleep(2_000) }
        }
        #expect(held, "the backup finished before its lock was seen")
        if held {
            kill(backup.processIdentifier, SIGSTOP)
            let result = try QBackupBinary.run(["merge", repo, "--keep", "1"])
            kill(backup.processIdentifier, SIGCONT)
            #expect(result.status == Self.busy, "\(result.stderr)")
            #expect(result.stderr.contains("qbackup (pid \(backup.processIdentifier))"), "\(result.stderr)")
        }
        backup.waitUntilExit()
        #expect(backup.terminationStatus == 0)
    }

    /// An image that qemu-nbd holds for writing: commands that would write it are busy (75);
    /// check keeps qemu-img's status (1: the check could not complete).
    @Test func anImageHeldByQemuIsBusy() throws {
        let dir = TempDir("qbackup-busy-image")
        let (disk, repo) = try Self.repository(dir)
        let nbd = try QemuNBD(image: disk, bitmap: nil, directory: dir, readOnly: false)
        defer { nbd.stop() }
        for args in [["backup", disk, "--repo", repo], ["bitmap", "add", disk, "other"]] {
            let result = try QBackupBinary.run(args)
            #expect(result.status == Self.busy, "\(args.prefix(2)): exit \(result.status) \(result.stderr)")
            #expect(result.stderr.hasPrefix("qbackup: error:") && result.stderr.contains("lock"), "\(result.stderr)")
        }
        #expect(try QBackupBinary.run(["check", disk]).status == 1)
    }
}
