import Foundation
import Testing
import TestSupport

/// Faults of `qbackup backup --libvirt` against a real libvirtd: a second job on the domain,
/// qbackup killed mid-backup, QEMU killed, libvirtd restarted. Nothing is lost: every point
/// restores byte-exact.
@Suite(.serialized) struct LibvirtFaultTests {
    @Test func faultsThroughLibvirt() throws {
        let libvirt = try LibvirtDaemon()
        defer { libvirt.stop() }
        try aSecondJobOnTheDomainIsRefusedAtOnce(libvirt)
        try aKilledBackupIsFinishedByTheNextRun(libvirt)
        try aKilledQEMUIsRecoveredWithAFullLayer(libvirt)
        try aLibvirtdRestartedMidJobLosesNothing(libvirt)
    }

    /// While one backup's job runs, a backup of the same domain into another repository exits
    /// 75 at once (not after libvirt's 30 s state lock); the first one completes.
    func aSecondJobOnTheDomainIsRefusedAtOnce(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-busy")
        try s.write(0x31, at: 0, length: 1 << 20)
        try s.start()
        var second: Tools.Result?
        var seconds = 0.0
        let json = try s.backup(during: {
            let started = Date()
            second = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri,
                                            "--repo", s.dir.file("other-repo")])
            seconds = Date().timeIntervalSince(started)
        })
        #expect(json["kind"] as? String == "full")
        #expect(second?.status == 75, "\(second?.stderr ?? "")")
        #expect(second?.stderr.contains("busy with another job") == true, "\(second?.stderr ?? "")")
        #expect(seconds < 10, "the refusal took \(seconds) s")
        #expect(!FileManager.default.fileExists(atPath: s.dir.file("other-repo/manifest.json")))
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }

    /// kill -9 of qbackup while its job runs: the next run aborts the job, drops the checkpoint
    /// the killed run made and takes an incremental from the last layer's checkpoint.
    func aKilledBackupIsFinishedByTheNextRun(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-kill")
        try s.write(0x41, at: 0, length: 1 << 20)
        try s.start()
        try s.backup()
        let kept = try #require(try s.layers().last?["checkpoint"] as? String)
        try s.write(0x42, at: 2 << 20, length: 64 << 10)

        let run = try RunningQBackup(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo],
                                     held: true, directory: s.dir)
        #expect(s.waitForJob(while: run), "the backup job never appeared")
        run.kill()
        _ = run.wait()
        #expect(try s.hasJob(), "the killed run's job should still be there")
        #expect(try libvirt.checkpoints(s.domain).count == 2, "the killed run made a checkpoint")
        #expect(try s.layers().count == 1)

        let next = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo,
                                          "--output", "json"])
        #expect(next.status == 0, "\(next.stderr)")
        let json = try JSONHelpers.parse(next.stdout) as? [String: Any] ?? [:]
        #expect(json["kind"] as? String == "incremental", "\(json)")
        #expect(json["bytes-copied"] as? Int == 64 << 10, "\(json)")
        let warnings = (json["warnings"] as? [String] ?? []).joined(separator: "\n")
        #expect(warnings.contains("aborted the backup job an interrupted run"), "\(json)")
        // Deleting the checkpoint the killed run made is routine: not a warning.
        #expect(!warnings.contains("does not need"), "\(json)")
        if let index = json["index"] as? Int { s.points["vda", default: [:]][index] = s.model["vda"] }
        let newest = try #require(try s.layers().last?["checkpoint"] as? String)
        #expect(newest != kept)
        #expect(try libvirt.checkpoints(s.domain) == [newest])
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }

    /// QEMU killed (-9): its checkpoints are inconsistent. A backup of the crashed (shut-off)
    /// domain drops them (metadata only), removes their bitmaps from the file and takes a full
    /// layer, saying so; the next live one is full again (no checkpoint could be made offline)
    /// and says so; then incrementals as before. Every point restores.
    func aKilledQEMUIsRecoveredWithAFullLayer(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-crash")
        try s.write(0x51, at: 0, length: 1 << 20)
        try s.start()
        try s.backup()
        try s.write(0x52, at: 3 << 20, length: 64 << 10)
        try s.backup()
        try s.write(0x53, at: 4 << 20, length: 64 << 10)
        // Unflushed guest writes may be lost with QEMU (its qcow2 metadata cache): the guest flushes.
        try libvirt.flush(s.domain)
        let pidText = try String(contentsOfFile: "/run/libvirt/qemu/\(s.domain).pid", encoding: .utf8)
        let pid = try #require(Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)))
        kill(pid, SIGKILL)
        let deadline = Date().addingTimeInterval(15)
        while (try? libvirt.state(s.domain)) != "shut off" && Date() < deadline { usleep(50_000) }
        #expect(try libvirt.state(s.domain) == "shut off")
        s.running = false
        waitForImageLocksToClear(s.disk("vda"))

        let recovered = try s.backup()
        #expect(recovered["kind"] as? String == "full", "\(recovered)")
        #expect((recovered["reason"] as? String)?.contains("checkpoint") == true, "\(recovered)")
        let warnings = (recovered["warnings"] as? [String] ?? []).joined(separator: "\n")
        #expect(warnings.contains("deleted checkpoint(s)"), "\(recovered)")
        #expect(warnings.contains("next live backup is a full one"), "\(recovered)")
        #expect(try libvirt.checkpoints(s.domain).isEmpty)
        let info = try Tools.run("qemu-img", ["info", "--output", "json", s.disk("vda")]).stdout
        #expect(!info.contains("qbackup-"), "stale bitmaps left in the file: \(info)")

        try s.start()
        let live = try s.backup(during: { try s.write(0x54, at: 5 << 20, length: 64 << 10) })
        #expect(live["kind"] as? String == "full", "\(live)")
        #expect((live["reason"] as? String)?.contains("no checkpoint") == true, "\(live)")
        let incremental = try s.backup()
        #expect(incremental["kind"] as? String == "incremental", "\(incremental)")
        #expect(incremental["bytes-copied"] as? Int == 64 << 10, "\(incremental)")
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }

    /// libvirtd restarted (stopped by its PID, started again) while the job runs: QEMU, the
    /// export and the job live on, so the run records its layer and exits 0 with a warning that
    /// it could not end the job (it died of SIGPIPE, exit 141 and no output, before); the next
    /// run aborts that job, still ours, and goes on incrementally from the layer's checkpoint.
    func aLibvirtdRestartedMidJobLosesNothing(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-restart")
        try s.write(0x61, at: 0, length: 1 << 20)
        try s.start()
        // No other suite may use libvirtd while it restarts.
        let (run, point) = try libvirt.alone {
            let run = try RunningQBackup(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo,
                                          "--output", "json"],
                                         held: true, directory: s.dir)
            #expect(s.waitForJob(while: run), "the backup job never appeared")
            let point = s.model["vda"]
            try libvirt.restartDaemon()
            #expect(run.isRunning, "the run ended before libvirtd was restarted; the test proves nothing")
            #expect(try s.hasJob(), "the job should outlive libvirtd")
            run.release()
            return (run, point)
        }
        let first = run.wait()
        #expect(first.status == 0, "status \(first.status): \(first.stderr)")
        let json = (try? JSONHelpers.parse(first.stdout) as? [String: Any]) ?? [:]
        #expect(json["kind"] as? String == "full", "\(first.stdout)")
        #expect((json["warnings"] as? [String] ?? []).contains { $0.contains("ending the backup job failed") }, "\(json)")
        if let index = json["index"] as? Int { s.points["vda", default: [:]][index] = point }
        #expect(try s.layers().count == 1)

        try s.write(0x62, at: 2 << 20, length: 64 << 10)
        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental", "\(next)")
        #expect(next["bytes-copied"] as? Int == 64 << 10, "\(next)")
        #expect((next["warnings"] as? [String] ?? []).contains { $0.contains("aborted the backup job an interrupted run") },
                "\(next)")
        let newest = try #require(try s.layers().last?["checkpoint"] as? String)
        #expect(try libvirt.checkpoints(s.domain) == [newest])
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }
}
