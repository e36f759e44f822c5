import Foundation
import Testing
import TestSupport

/// Faults during live backups: qbackup killed at seeded moments, QEMU quitting or killed
/// mid-backup, the NBD connection dropped. Afterwards the next backup is correct
/// (incremental when the bitmaps survived, full otherwise), nothing of qbackup's is left
/// in QEMU, and every point restores to the model: no tracked change is lost.
@Suite struct QMPFaultTests {
    /// Starts a backup held open (debug builds) until it is released, and waits until its export exists.
    static func startHeldBackup(_ s: LiveScenario) throws -> RunningQBackup {
        let vm = try #require(s.vm)
        let run = try RunningQBackup(["backup", "--qmp", vm.qmpSocket, "--repo", s.repo, "--output", "json"],
                                     held: true, directory: s.dir)
        let deadline = Date().addingTimeInterval(30)
        while run.isRunning && Date() < deadline {
            if !((try vm.monitor.execute("query-block-exports") as? [Any]) ?? []).isEmpty { return run }
            usleep(5_000)
        }
        Issue.record("the export never appeared")
        return run
    }

    /// A VM with one backup taken and then `changed` (pattern, offset, length) written and flushed;
    /// the next backup is held open (debug builds) while `fault` strikes, then released, and must fail
    /// (exit 1, a `qbackup: error:` line). Returns the scenario for what comes after.
    static func interruptedBackup(_ name: String, first: UInt8, changed: (UInt8, at: Int, length: Int),
                                  sourceLocation: SourceLocation = #_sourceLocation,
                                  fault: (LiveScenario, QemuVM) throws -> Void) throws -> LiveScenario {
        let s = try LiveScenario(name)
        try s.write(first, at: 0, length: 1 << 20)
        try s.startVM()
        let vm = try #require(s.vm, sourceLocation: sourceLocation)
        try s.backup()
        try s.write(changed.0, at: changed.at, length: changed.length)
        try vm.flush()
        let run = try Self.startHeldBackup(s)
        try fault(s, vm)
        let failed = run.wait()  // releases it
        #expect(failed.status == 1, "\(failed.stderr)", sourceLocation: sourceLocation)
        #expect(failed.stderr.contains("qbackup: error:"), "\(failed.stderr)", sourceLocation: sourceLocation)
        return s
    }

    /// Layers a run recorded (or not) before it died hold the model as it was then.
    static func adoptLayers(_ s: LiveScenario, model: [UInt8]) throws {
        // (A run killed before its first manifest leaves nothing that lists.)
        let list = try? JSONHelpers.parse(try QBackupBinary.run(["list", s.repo, "--output", "json"]).stdout) as? [String: Any]
        for layer in list?["layers"] as? [[String: Any]] ?? [] {
            if let index = layer["index"] as? Int, s.points[index] == nil { s.points[index] = model }
        }
    }

    @Test(arguments: [UInt64(1), 2, 3])
    func killOfQBackupAtSeededMoments(seed: UInt64) throws {
        var random = SeededRandom(seed: seed)
        let s = try LiveScenario("live-kill-\(seed)")
        try s.write(0x51, at: 0, length: 2 << 20)
        try s.startVM()
        let vm = try #require(s.vm)
        for round in 0..<3 {
            // Round 0 kills a full backup (empty repository), later ones incrementals.
            let model = s.model
            let run = try RunningQBackup(["backup", "--qmp", vm.qmpSocket, "--repo", s.repo],
                                         environment: ["QBACKUP_DEBUG_LIVE_PAUSE": "0.2"], directory: s.dir)
            usleep(UInt32.random(in: 0...600_000, using: &random))
            run.kill()
            _ = run.wait()
            try Self.adoptLayers(s, model: model)
            try s.write(UInt8(0x60 + round), at: (round + 3) << 20, length: 64 << 10)
            let next = try s.backup()
            #expect(next["kind"] != nil, "round \(round): the backup after the kill failed")
            try s.checkNothingLeft()
            let bitmaps = try vm.bitmaps()
            #expect(bitmaps.count == 1 && !bitmaps.keys.contains { $0.hasSuffix(".frozen") }, "\(bitmaps.keys)")
        }
        try s.write(0x6f, at: 14 << 20, length: 64 << 10)
        #expect(try s.backup()["kind"] as? String == "incremental")
        try s.checkEveryPoint()
    }

    /// QEMU quits mid-backup: the backup fails clearly; both bitmaps were stored, so after a
    /// restart the next backup merges NAME.frozen back and is an incremental that misses nothing.
    @Test func qemuQuitMidBackup() throws {
        let s = try Self.interruptedBackup("live-quit", first: 0x71,
                                           changed: (0x72, at: 2 << 20, length: 128 << 10)) { s, _ in s.quitVM() }
        try s.startVM()
        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental")
        #expect(next["bytes-copied"] as? Int == 128 << 10)
        try s.checkNothingLeft()
        try s.checkEveryPoint()
    }

    /// QEMU quits mid-backup and the VM stays off: the offline backup of the file merges the
    /// stored NAME.frozen back, so its incremental misses nothing.
    @Test func offlineBackupAfterQuitMidBackup() throws {
        let s = try Self.interruptedBackup("live-quit-offline", first: 0x75,
                                           changed: (0x76, at: 2 << 20, length: 128 << 10)) { s, _ in s.quitVM() }
        let info = try Tools.qemuImg("info", "--output=json", s.disk).stdout
        #expect(info.contains(".frozen"), "QEMU stored no frozen bitmap: the test proves nothing")
        try s.write(0x77, at: 6 << 20, length: 64 << 10)
        let offline = try s.backup()
        #expect(offline["kind"] as? String == "incremental")
        #expect(offline["bytes-copied"] as? Int == (128 + 64) << 10)
        #expect(try !Tools.qemuImg("info", "--output=json", s.disk).stdout.contains(".frozen"))
        try s.checkEveryPoint()
        let verify = try QBackupBinary.run(["verify", s.repo, "--image", s.disk])
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
    }

    /// QEMU killed mid-backup: its bitmaps are lost or stay in_use in the file, so the next backup is a full one.
    @Test func qemuKilledMidBackup() throws {
        let s = try Self.interruptedBackup("live-qemu-killed", first: 0x81,
                                           changed: (0x82, at: 2 << 20, length: 64 << 10)) { _, vm in vm.stop() }
        waitForImageLocksToClear(s.disk)
        try s.startVM()
        let next = try s.backup()
        #expect(next["kind"] as? String == "full")
        // The bitmap was added in this QEMU session and never stored (QEMU writes persistent
        // bitmaps on a clean close only), so after the kill it is missing; one loaded from the
        // file would be inconsistent (see QMPBackupTests.refusals). Either way: full, saying why.
        #expect((next["reason"] as? String).map { $0.contains("missing") || $0.contains("inconsistent") } == true,
                "\(next)")
        try s.write(0x83, at: 5 << 20, length: 64 << 10)
        #expect(try s.backup()["kind"] as? String == "incremental")
        try s.checkNothingLeft()
        try s.checkEveryPoint()
    }

    /// qbackup's fleecing job cancelled from outside mid-backup: the export stays up but no
    /// longer holds the point in time (a guest write made after the cancel reads through). The
    /// run fails and records nothing; the next backup is an incremental that misses nothing.
    @Test func fleecingJobCancelledMidBackup() throws {
        let s = try Self.interruptedBackup("live-job-cancel", first: 0xa1,
                                           changed: (0xa2, at: 2 << 20, length: 64 << 10)) { s, vm in
            let jobs = try vm.monitor.execute("query-block-jobs") as? [[String: Any]] ?? []
            let job = try #require(jobs.compactMap { $0["device"] as? String }.first { $0.hasPrefix("qb-job-") })
            try vm.monitor.execute("block-job-cancel", ["device": job, "force": true])
            let deadline = Date().addingTimeInterval(30)
            while !(try vm.monitor.execute("query-block-jobs") as? [Any] ?? []).isEmpty && Date() < deadline {
                usleep(10_000)
            }
            // After the point in time, over the changed range: the held run would read it.
            try s.write(0xa3, at: 2 << 20, length: 64 << 10)
            try vm.flush()
        }
        let layers = try JSONHelpers.parse(try QBackupBinary.run(["list", s.repo, "--output", "json"]).stdout)
            as? [String: Any]
        #expect((layers?["layers"] as? [Any])?.count == 1, "the failed run recorded a layer")
        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental")
        #expect(next["bytes-copied"] as? Int == 64 << 10)
        try s.checkNothingLeft()
        try s.checkEveryPoint()
    }

    /// The NBD connection dropped (the export deleted under it): a clear error, the bits merged
    /// back, the next backup incremental and complete.
    @Test func nbdConnectionDropped() throws {
        let s = try Self.interruptedBackup("live-drop", first: 0x91, changed: (0x92, at: 3 << 20, length: 64 << 10)) { _, vm in
            let exports = try vm.monitor.execute("query-block-exports") as? [[String: Any]] ?? []
            let id = try #require(exports.first?["id"] as? String)
            try vm.monitor.execute("block-export-del", ["id": id, "mode": "hard"])
        }
        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental")
        #expect(next["bytes-copied"] as? Int == 64 << 10)
        try s.checkNothingLeft()
        try s.checkEveryPoint()
    }
}
