import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Issue 17 item 8: `contrib/qbackup-offline-nightly` against a real libvirtd with a paused
/// TCG domain (no OS: it never shuts down on ACPI). A timeout skips the backup and leaves the
/// VM running (never destroyed); when the guest is off (`virsh destroy` stands in for a guest
/// that shut down) the backup runs and the VM is started again, also when the backup fails.
/// The systemd units verify clean.
@Suite(.serialized) struct OfflineNightlyTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    static var script: String { root.appendingPathComponent("contrib/qbackup-offline-nightly").path }

    /// A folder QEMU (user libvirt-qemu) can reach, with a 16 MiB disk holding some data.
    static func disk(_ dir: TempDir) throws -> String {
        chmod(dir.path, 0o755)
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "16M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x5a 1M 300k", "write -P 0x17 9M 64k"])
        return disk
    }

    /// The script started in the background, its stderr going to a file.
    final class Night {
        let process = Process()
        let log: String

        init(_ arguments: [String], log: String) throws {
            self.log = log
            FileManager.default.createFile(atPath: log, contents: nil)
            process.executableURL = URL(fileURLWithPath: "/bin/bash")
            process.arguments = [OfflineNightlyTests.script] + arguments
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle(forWritingAtPath: log)
            try process.run()
        }

        var text: String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

        /// Waits until the log holds `needle` (or the script ended).
        func waitFor(_ needle: String, seconds: Double = 60) -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                if text.contains(needle) { return true }
                if !process.isRunning { return text.contains(needle) }
                usleep(100_000)
            }
            return false
        }

        func wait(seconds: Double = 120) -> Int32 {
            let deadline = Date().addingTimeInterval(seconds)
            while process.isRunning && Date() < deadline { usleep(100_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    /// One libvirtd for both paths (its start costs seconds).
    @Test func bothPathsAgainstARealLibvirtd() throws {
        let started = Date()
        let libvirt = try LibvirtDaemon()
        defer { libvirt.stop() }
        print("offline nightly: libvirtd answered after \(Int(Date().timeIntervalSince(started) * 1000)) ms")
        try aGuestThatDoesNotShutDownIsLeftRunningAndNotBackedUp(libvirt)
        print("offline nightly: timeout path done after \(Int(Date().timeIntervalSince(started) * 1000)) ms")
        try aGuestThatShutDownIsBackedUpAndStartedAgainEvenWhenTheBackupFails(libvirt)
        print("offline nightly: backup paths done after \(Int(Date().timeIntervalSince(started) * 1000)) ms")
    }

    func aGuestThatDoesNotShutDownIsLeftRunningAndNotBackedUp(_ libvirt: LibvirtDaemon) throws {
        let dir = TempDir("qbackup-nightly")
        let disk = try Self.disk(dir)
        let domain = "qbackup-nightly-\(UUID().uuidString.prefix(8))"
        try libvirt.startDomainWithoutOS(domain, disk: disk)
        defer { libvirt.remove(domain) }
        let repo = dir.file("repo")
        let started = Date()
        let night = try Night(["--timeout", "3", "--connect", libvirt.uri, "--qbackup", try QBackupBinary.path(),
                               "--retention", "--keep 1", domain, disk, repo], log: dir.file("night.log"))
        let status = night.wait()
        #expect(status == 75, "\(night.text)")
        #expect(Date().timeIntervalSince(started) >= 3)
        #expect(night.text.contains("did not shut down within 3s"), "\(night.text)")
        #expect(night.text.contains("left running"), "\(night.text)")
        #expect(try libvirt.state(domain) == "running", "the VM must be left running, never destroyed")
        #expect(!FileManager.default.fileExists(atPath: repo), "a backup ran although the VM did not shut down")
    }

    func aGuestThatShutDownIsBackedUpAndStartedAgainEvenWhenTheBackupFails(_ libvirt: LibvirtDaemon) throws {
        let dir = TempDir("qbackup-nightly")
        let disk = try Self.disk(dir)
        let reference = dir.file("reference.raw")
        try Tools.qemuImg("convert", "-O", "raw", disk, reference)
        let domain = "qbackup-nightly-\(UUID().uuidString.prefix(8))"
        try libvirt.startDomainWithoutOS(domain, disk: disk)
        defer { libvirt.remove(domain) }
        let repo = dir.file("repo")
        let binary = try QBackupBinary.path()

        // The guest "shuts down" (virsh destroy, from a step of its own) while the script waits.
        let night = try Night(["--timeout", "60", "--connect", libvirt.uri, "--qbackup", binary,
                               "--retention", "--keep 1", domain, disk, repo], log: dir.file("night1.log"))
        #expect(night.waitFor("waiting up to 60s"), "\(night.text)")
        #expect(try libvirt.virsh(["destroy", domain]).status == 0)
        let status = night.wait()
        #expect(status == 0, "\(night.text)")
        #expect(night.text.contains("backup done"), "\(night.text)")
        #expect(try libvirt.state(domain) == "running", "the VM was not started again: \(night.text)")
        let list = try QBackupBinary.run(["list", repo, "--output", "json"])
        let layers = (try JSONHelpers.parse(list.stdout) as? [String: Any])?["layers"] as? [[String: Any]] ?? []
        #expect(layers.count == 1, "\(list.stdout)")
        let restored = dir.file("restored.raw")
        let restore = try QBackupBinary.run(["restore", repo, "--to", restored, "--format", "raw"])
        #expect(restore.status == 0, "\(restore.stderr)")
        #expect(try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", restored, reference]).status == 0)

        // A backup that fails (an image that is not there) still starts the VM again.
        let failing = try Night(["--timeout", "60", "--connect", libvirt.uri, "--qbackup", binary,
                                 domain, dir.file("missing.qcow2"), repo], log: dir.file("night2.log"))
        #expect(failing.waitFor("waiting up to 60s"), "\(failing.text)")
        #expect(try libvirt.virsh(["destroy", domain]).status == 0)
        let failed = failing.wait()
        #expect(failed != 0 && failed != 75, "\(failing.text)")
        #expect(failing.text.contains("backup failed"), "\(failing.text)")
        #expect(try libvirt.state(domain) == "running", "the VM was not started again after a failed backup")
    }

    /// `systemd-analyze verify` of the template units, instantiated, is clean (the script path
    /// pointed at this tree's copy: nothing is installed here).
    @Test func systemdUnitsVerifyClean() throws {
        let analyze = try Tools.which("systemd-analyze", hint: "systemd")
        let dir = TempDir("qbackup-units")
        for unit in ["qbackup@.service", "qbackup@.timer"] {
            var text = try String(contentsOf: Self.root.appendingPathComponent("contrib/systemd/\(unit)"), encoding: .utf8)
            text = text.replacingOccurrences(of: "/usr/bin/qbackup-offline-nightly", with: Self.script)
            text = text.replacingOccurrences(of: "man:qbackup(1) ", with: "")
            try text.write(toFile: dir.file(unit), atomically: true, encoding: .utf8)
        }
        let result = try Tools.run(analyze, ["verify", dir.file("qbackup@web.service"), dir.file("qbackup@web.timer")],
                                   cwd: dir.path)
        #expect(result.status == 0 && result.stdout.isEmpty && result.stderr.isEmpty,
                "systemd-analyze verify: \(result.stdout)\(result.stderr)")
    }
}
