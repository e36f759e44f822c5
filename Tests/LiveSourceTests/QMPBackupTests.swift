import Foundation
import Testing
import TestSupport

/// `qbackup backup --qmp` (the real binary) against a real QEMU: point in time, mixed
/// offline/live chains, bitmap states and refusals. Every point restores byte-exact to a model.
@Suite struct QMPBackupTests {
    /// Writes made while a backup runs are not in that layer but in the next one. The test
    /// watches its own monitor and writes once the export exists; the run is held (debug
    /// builds) until the writes are done, so the window does not depend on the machine's speed.
    @Test func writesDuringABackupLandInTheNextLayer() throws {
        let s = try LiveScenario("live-pit")
        try s.write(0x11, at: 0, length: 3 << 20)
        try s.write(0x12, at: 10 << 20, length: 1 << 20)
        try s.startVM()
        let vm = try #require(s.vm)

        for round in 0..<2 {
            let before = s.model
            let run = try RunningQBackup(["backup", "--qmp", vm.qmpSocket, "--repo", s.repo, "--output", "json"],
                                         held: true, directory: s.dir)
            // Wait for the export, then write over data the backup has not read yet.
            let deadline = Date().addingTimeInterval(30)
            var exported = false
            while !exported && Date() < deadline && run.isRunning {
                exported = !((try vm.monitor.execute("query-block-exports") as? [Any]) ?? []).isEmpty
                if !exported { usleep(5_000) }
            }
            #expect(exported, "the export never appeared")
            let pattern = UInt8(0xa0 + round)
            try s.write(pattern, at: 1 << 20, length: 64 << 10)
            try s.write(pattern, at: 12 << 20, length: 128 << 10)
            let stillExported = !((try vm.monitor.execute("query-block-exports") as? [Any]) ?? []).isEmpty
            #expect(stillExported, "the writes came after the backup; the test proves nothing")
            let result = run.wait()
            #expect(result.status == 0, "\(result.stderr)")
            let json = try JSONHelpers.parse(result.stdout) as? [String: Any] ?? [:]
            #expect(json["kind"] as? String == (round == 0 ? "full" : "incremental"))
            if let index = json["index"] as? Int { s.points[index] = before }
            try s.checkNothingLeft()
        }
        // The writes of the last window are in the next layer.
        let last = try s.backup()
        #expect(last["kind"] as? String == "incremental")
        #expect(last["bytes-copied"] as? Int == (64 + 128) << 10)
        try s.checkEveryPoint()
        let bitmaps = try vm.bitmaps()
        #expect(bitmaps.count == 1 && bitmaps.values.first?.recording == true, "\(bitmaps.keys)")
    }

    /// Offline full, live incrementals, offline incremental: one chain, one bitmap; every point
    /// restores byte-exact and verify --image passes. Each layer records how it was taken
    /// (mode offline or qmp), in backup's JSON and in list's.
    @Test func mixedOfflineAndLiveChain() throws {
        let s = try LiveScenario("live-mixed")
        try s.write(0x21, at: 0, length: 2 << 20)
        let full = try s.backup()
        #expect(full["kind"] as? String == "full")
        #expect(full["mode"] as? String == "offline")
        try s.write(0x22, at: 4 << 20, length: 1 << 20)
        try s.startVM()
        let first = try s.backup()
        #expect(first["kind"] as? String == "incremental")
        #expect(first["mode"] as? String == "qmp")
        try s.write(0x23, at: 1 << 20, length: 64 << 10)
        try s.write(0x24, at: 15 << 20, length: 1 << 20)
        let second = try s.backup()
        #expect(second["kind"] as? String == "incremental")
        #expect(second["mode"] as? String == "qmp")
        #expect(second["bytes-copied"] as? Int == (64 << 10) + (1 << 20))
        try s.checkNothingLeft()
        try s.write(0x25, at: 8 << 20, length: 64 << 10)
        s.quitVM()
        try s.write(0x26, at: 9 << 20, length: 64 << 10)
        let offline = try s.backup()
        #expect(offline["kind"] as? String == "incremental")
        #expect(offline["mode"] as? String == "offline")
        #expect(offline["bytes-copied"] as? Int == 128 << 10)
        #expect(try layerModes(s.repo) == ["offline", "qmp", "qmp", "offline"])
        try s.checkEveryPoint()
        let verify = try QBackupBinary.run(["verify", s.repo, "--image", s.disk])
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
        let check = try Tools.run(try Tools.which("qemu-img"), ["check", s.disk])
        #expect(check.status == 0, "\(check.stdout)")
    }

    /// --progress on a live backup: the same plain lines on stderr as an offline backup
    /// (no terminal here), ending at 100%; stdout keeps the one-line summary.
    @Test func progressAsForOfflineBackups() throws {
        let s = try LiveScenario("live-progress")
        try s.write(0x51, at: 0, length: 4 << 20)
        try s.startVM()
        let vm = try #require(s.vm)
        let result = try QBackupBinary.run(["backup", "--qmp", vm.qmpSocket, "--repo", s.repo, "--progress"])
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stderr.split(separator: "\n").map(String.init).filter { !$0.hasPrefix("qbackup: note:") }
        #expect(lines.count >= 2, "\(result.stderr)")
        #expect(!result.stderr.contains("\r") && !result.stderr.contains("\u{1B}"))
        for line in lines {
            #expect(line.range(of: #"^backup: \d+\.\d% .+/.+, .+/s, "#, options: .regularExpression) != nil, "\(line)")
        }
        #expect(lines.last?.contains("100.0%") == true && lines.last?.contains("done in ") == true, "\(lines)")
        #expect(result.stdout.hasPrefix("full backup: layer 0"), "\(result.stdout)")
        try s.checkNothingLeft()
    }

    /// --fleece-dir puts the overlay there (not beside the disk); --nbd-server unix:PATH uses the
    /// NBD server QEMU already runs and leaves it running; without it, that server is refused.
    @Test func fleeceDirAndAnExistingNBDServer() throws {
        let s = try LiveScenario("live-fleece-dir")
        try s.write(0x61, at: 0, length: 2 << 20)
        try s.startVM()
        let vm = try #require(s.vm)
        let socket = s.dir.file("their-nbd.sock")
        try vm.monitor.execute("nbd-server-start", ["addr": ["type": "unix", "data": ["path": socket]]])
        try s.backup([], expectStatus: 1)  // QEMU's server is not qbackup's: refused without --nbd-server
        let fleece = s.dir.file("fleece")
        try FileManager.default.createDirectory(atPath: fleece, withIntermediateDirectories: true)
        let run = try RunningQBackup(["backup", "--qmp", vm.qmpSocket, "--repo", s.repo, "--output", "json",
                                      "--fleece-dir", fleece, "--nbd-server", "unix:\(socket)"],
                                     held: true, directory: s.dir)
        let before = s.model
        let deadline = Date().addingTimeInterval(30)
        var overlays: [String] = []
        while overlays.isEmpty && Date() < deadline && run.isRunning {
            overlays = ((try? FileManager.default.contentsOfDirectory(atPath: fleece)) ?? []).filter { $0.hasPrefix(".qbackup-fleece-") }
            if overlays.isEmpty { usleep(5_000) }
        }
        #expect(overlays.count == 1, "no overlay in --fleece-dir")
        let beside = (try FileManager.default.contentsOfDirectory(atPath: s.dir.path)).filter { $0.hasPrefix(".qbackup-") }
        #expect(beside.isEmpty, "\(beside)")
        let result = run.wait()
        #expect(result.status == 0, "\(result.stderr)")
        let json = try JSONHelpers.parse(result.stdout) as? [String: Any] ?? [:]
        if let index = json["index"] as? Int { s.points[index] = before }
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: fleece)) ?? ["?"]).isEmpty)
        // QEMU's own server is still running: starting another is refused.
        #expect(throws: (any Error).self) {
            try vm.monitor.execute("nbd-server-start", ["addr": ["type": "unix", "data": ["path": s.dir.file("other.sock")]]])
        }
        try s.checkNothingLeft()
        try s.checkEveryPoint()
    }

    /// A VM with two disks: without --node qbackup refuses and names the nodes; --node picks one.
    @Test func nodeChoosesAmongSeveralDisks() throws {
        let dir = TempDir("live-two-disks")
        let first = dir.file("a.qcow2")
        let second = dir.file("b.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", first, "4M")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", second, "4M")
        try Tools.qemuIO(first, format: "qcow2", ["write -P 0x71 0 1M"])
        try Tools.qemuIO(second, format: "qcow2", ["write -P 0x72 1M 1M"])
        let vm = try QemuVM(disk: first, directory: dir, otherDisks: [second])
        defer { vm.quit() }
        let refused = try QBackupBinary.run(["backup", "--qmp", vm.qmpSocket, "--repo", dir.file("repo")])
        #expect(refused.status == 1)
        #expect(refused.stderr.hasPrefix("qbackup: error:") && refused.stderr.contains("--node")
                && refused.stderr.contains("disk1"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("repo/manifest.json")))
        let chosen = try QBackupBinary.run(["backup", "--qmp", vm.qmpSocket, "--node", "disk1", "--repo", dir.file("repo")])
        #expect(chosen.status == 0, "\(chosen.stderr)")
        let out = dir.file("restored.raw")
        let restored = try QBackupBinary.run(["restore", dir.file("repo"), "--to", out, "--format", "raw"])
        #expect(restored.status == 0, "\(restored.stderr)")
        let compare = try Tools.run(try Tools.which("qemu-img"), ["compare", "-U", "-f", "raw", "-F", "qcow2", out, second])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
    }

    /// --dry-run reports QEMU's dirty count and changes nothing.
    @Test func dryRunChangesNothing() throws {
        let s = try LiveScenario("live-dry")
        try s.write(0x31, at: 0, length: 1 << 20)
        try s.startVM()
        let vm = try #require(s.vm)
        try s.backup()
        try s.write(0x32, at: 2 << 20, length: 192 << 10)
        let manifest = try Data.contents(of: s.dir.file("repo/manifest.json"))
        let dry = try s.backup(["--dry-run"])
        #expect(dry["kind"] as? String == "incremental")
        #expect(dry["bytes-copied"] as? Int == 192 << 10)
        #expect(try Data.contents(of: s.dir.file("repo/manifest.json")) == manifest)
        #expect(try vm.bitmaps().values.first?.count == 192 << 10)
        try s.checkNothingLeft()
    }

    /// A node that is not qcow2, and --incremental without a usable bitmap: clear errors, nothing changed.
    @Test func refusals() throws {
        let dir = TempDir("live-refuse")
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("create", "-q", "-f", "raw", raw, "4M")
        let rawVM = try QemuVM(disk: raw, directory: dir, format: "raw")
        defer { rawVM.quit() }
        let refused = try QBackupBinary.run(["backup", "--qmp", rawVM.qmpSocket, "--repo", dir.file("repo")])
        #expect(refused.status == 1)
        #expect(refused.stderr.hasPrefix("qbackup: error:") && refused.stderr.contains("raw"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("repo/manifest.json")))

        let s = try LiveScenario("live-refuse-bitmap")
        try s.write(0x41, at: 0, length: 1 << 20)
        try s.startVM()
        let vm = try #require(s.vm)
        let first = try s.backup()
        let name = try #require(first["bitmap"] as? String)
        // Missing bitmap: --incremental refuses, auto takes a full layer and says why.
        try vm.monitor.execute("block-dirty-bitmap-remove", ["node": vm.node, "name": name])
        let manifest = try Data.contents(of: s.dir.file("repo/manifest.json"))
        let noBitmap = try s.backup(["--incremental"], expectStatus: 1)
        #expect((noBitmap["error"] as? [String: Any]) != nil || noBitmap.isEmpty)
        #expect(try Data.contents(of: s.dir.file("repo/manifest.json")) == manifest)
        #expect(try vm.bitmaps().isEmpty)
        try s.checkNothingLeft()
        let auto = try s.backup()
        #expect(auto["kind"] as? String == "full")
        #expect((auto["reason"] as? String)?.contains("missing") == true, "\(auto)")

        // Inconsistent bitmap: QEMU killed, so the file keeps it in_use; the next QEMU loads it inconsistent.
        try s.write(0x42, at: 3 << 20, length: 64 << 10)
        s.vm?.quit()  // clean close first: the bitmap is stored
        try s.startVM()
        try s.backup()
        try s.write(0x43, at: 5 << 20, length: 64 << 10)
        try s.vm?.flush()  // (a write the guest did not flush may be lost with QEMU: not ours to keep)
        s.vm?.stop()  // kill -9
        waitForImageLocksToClear(s.disk)
        try s.startVM()
        let restarted = try #require(s.vm)
        #expect(try restarted.bitmaps()[name]?.inconsistent == true)
        let inconsistent = try s.backup(["--incremental"], expectStatus: 1)
        _ = inconsistent
        #expect(try restarted.bitmaps()[name]?.inconsistent == true)
        let recovered = try s.backup()
        #expect(recovered["kind"] as? String == "full")
        #expect(try restarted.bitmaps()[name]?.inconsistent == false)
        try s.write(0x44, at: 6 << 20, length: 64 << 10)
        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental")
        #expect(next["bytes-copied"] as? Int == 64 << 10)
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }
}
