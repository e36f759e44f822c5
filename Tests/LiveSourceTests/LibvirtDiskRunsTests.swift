import Foundation
import Testing
import TestSupport

/// `qbackup backup --libvirt` of a domain with two disks (the real binary, a real libvirtd, a
/// paused TCG domain): ONE job for both, so both repositories' points are of one moment (a
/// write to both disks during the job is in neither layer, and in the next); DIR/vda and
/// DIR/vdb with the group's id and sequence at DIR's top; libvirt holding exactly the
/// checkpoints the repositories need.
@Suite(.serialized) struct LibvirtDiskRunsTests {
    @Test func twoDisksInOneJob() throws {
        let libvirt = try LibvirtDaemon()
        defer { libvirt.stop() }
        try bothDisksAreOfOneMomentAndEachGoesOnFromItsOwnCheckpoint(libvirt)
        try aOneDiskRepositoryRefusesSeveralDisks(libvirt)
        try aKilledTwoDiskBackupIsFinishedByTheNextRun(libvirt)
        try aFailedDiskRecordsNoLayerOfTheJob(libvirt)
    }

    /// The group record at DIR's top.
    func group(_ s: LibvirtScenario) throws -> (id: String, sequence: Int) {
        let text = try String(contentsOfFile: s.repo + "/libvirt-group.json", encoding: .utf8)
        let json = try JSONHelpers.parse(text) as? [String: Any] ?? [:]
        return (json["id"] as? String ?? "", json["sequence"] as? Int ?? -1)
    }

    func bothDisksAreOfOneMomentAndEachGoesOnFromItsOwnCheckpoint(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-two", targets: ["vda", "vdb"])
        try s.write(0x11, at: 0, length: 1 << 20, disk: "vda")
        try s.write(0x21, at: 0, length: 1 << 20, disk: "vdb")
        try s.start()

        // Full: both disks in one job (no --disk: every disk of the domain).
        let full = try s.backup(during: {
            try s.write(0xa1, at: 64 << 10, length: 64 << 10, disk: "vda")
            try s.write(0xb1, at: 2 << 20, length: 64 << 10, disk: "vdb")
        })
        #expect(full["index"] == nil, "several disks report per disk: \(full)")
        #expect((full["disks"] as? [[String: Any]])?.map { $0["disk"] as? String } == ["vda", "vdb"], "\(full)")
        let (id, sequence) = try group(s)
        #expect(sequence == 1, "one job, one sequence number used")
        let first = "qbackup-\(id)-0"
        for (target, disk) in s.byDisk(full) {
            #expect(disk["kind"] as? String == "full", "\(target): \(disk)")
            #expect(disk["mode"] as? String == "libvirt", "\(target): \(disk)")
            #expect(disk["checkpoint"] as? String == first, "\(target): \(disk)")
            #expect(disk["repository"] as? String == "\(s.repo)/\(target)", "\(target): \(disk)")
            #expect(try s.layers(target).last?["checkpoint"] as? String == first)
        }
        #expect(try libvirt.checkpoints(s.domain) == [first], "one checkpoint for both disks")
        #expect(!FileManager.default.fileExists(atPath: s.repo + "/manifest.json"), "DIR itself is no repository")
        try s.checkNothingLeft()

        // The top folder: list shows each disk's repository; a command for one repository is
        // refused, naming them, and writes nothing; backup --libvirt goes on below.
        let list = try QBackupBinary.run(["list", s.repo, "--output", "json"])
        #expect(list.status == 0, "\(list.stderr)")
        let disksListed = (try JSONHelpers.parse(list.stdout) as? [String: Any])?["disks"] as? [[String: Any]] ?? []
        #expect(disksListed.map { $0["disk"] as? String } == ["vda", "vdb"], "\(list.stdout)")
        #expect(disksListed.map { ($0["layers"] as? [[String: Any]])?.map { $0["checkpoint"] as? String } } == [[first], [first]], "\(list.stdout)")
        let topFiles = try FileManager.default.contentsOfDirectory(atPath: s.repo).sorted()
        for command in [["verify", s.repo], ["backup", s.disk("vda"), "--repo", s.repo, "--dry-run"]] {
            let refused = try QBackupBinary.run(command)
            #expect(refused.status == 1 && refused.errorLines
                    == ["qbackup: error: \(s.repo) holds the repositories of several disks (vda, vdb); name one: \(s.repo)/vda"],
                    "\(command): \(refused.stderr)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: s.repo).sorted() == topFiles)

        // Incremental: each disk copies the write made during the full job, nothing else.
        let incremental = try s.backup(during: {
            try s.write(0xa2, at: 4 << 20, length: 64 << 10, disk: "vda")
            try s.write(0xb2, at: 5 << 20, length: 64 << 10, disk: "vdb")
        })
        let second = "qbackup-\(id)-1"
        for (target, disk) in s.byDisk(incremental) {
            #expect(disk["kind"] as? String == "incremental", "\(target): \(disk) \(s.stderr)")
            #expect(disk["bytes-copied"] as? Int == 64 << 10, "\(target): \(disk)")
            #expect(disk["checkpoint"] as? String == second, "\(target): \(disk)")
        }
        #expect(s.byDisk(incremental).count == 2)
        #expect(try group(s).sequence == 2)
        #expect(try libvirt.checkpoints(s.domain) == [second])

        // A dry run reports each disk (the write of the last window, 64 KiB each) and changes nothing.
        let dry = try s.backup(["--dry-run"])
        for (target, disk) in s.byDisk(dry) {
            #expect(disk["dry-run"] as? Bool == true, "\(target): \(disk)")
            #expect(disk["kind"] as? String == "incremental", "\(target): \(disk)")
            #expect(disk["bytes-copied"] as? Int == 64 << 10, "\(target): \(disk)")
        }
        #expect(s.byDisk(dry).count == 2, "\(dry)")
        #expect(try s.layers("vda").count == 2 && s.layers("vdb").count == 2)
        #expect(try group(s).sequence == 2 && libvirt.checkpoints(s.domain) == [second])
        let human = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo, "--dry-run"])
        #expect(human.status == 0, "\(human.stderr)")
        #expect(human.stdout.contains("vda: would take an incremental backup as layer 2")
                && human.stdout.contains("vdb: would take an incremental backup as layer 2"), "\(human.stdout)")

        // The writes of the incremental's window are in the next layers.
        let third = try s.backup()
        for (target, disk) in s.byDisk(third) {
            #expect(disk["bytes-copied"] as? Int == 64 << 10, "\(target): \(disk)")
        }
        let thirdCheckpoint = "qbackup-\(id)-2"
        #expect(try libvirt.checkpoints(s.domain) == [thirdCheckpoint])

        // vda alone (DIR stays the group's): vdb's repository still needs its checkpoint, so
        // libvirt keeps both; the next run of both disks takes each from its own checkpoint.
        try s.write(0xa3, at: 6 << 20, length: 64 << 10, disk: "vda")
        try s.write(0xb3, at: 6 << 20, length: 128 << 10, disk: "vdb")
        let alone = try s.backup(["--disk", "vda"])
        #expect(s.byDisk(alone).keys.sorted() == ["vda"], "\(alone)")
        #expect(s.byDisk(alone)["vda"]?["bytes-copied"] as? Int == 64 << 10, "\(alone)")
        let fourth = "qbackup-\(id)-3"
        #expect(try libvirt.checkpoints(s.domain) == [thirdCheckpoint, fourth])
        let both = try s.backup()
        let fifth = "qbackup-\(id)-4"
        #expect(s.byDisk(both)["vda"]?["kind"] as? String == "incremental", "\(both)")
        #expect(s.byDisk(both)["vda"]?["bytes-copied"] as? Int == 0, "\(both)")
        #expect(s.byDisk(both)["vdb"]?["kind"] as? String == "incremental", "\(both)")
        #expect(s.byDisk(both)["vdb"]?["bytes-copied"] as? Int == 128 << 10, "vdb since its own checkpoint: \(both)")
        #expect(try libvirt.checkpoints(s.domain) == [fifth])

        // Shut off: each disk from its file, the same checkpoint recorded, none made.
        try s.destroy()
        try s.write(0xa4, at: 7 << 20, length: 64 << 10, disk: "vda")
        try s.write(0xb4, at: 1 << 20, length: 64 << 10, disk: "vdb")
        let offline = try s.backup()
        for (target, disk) in s.byDisk(offline) {
            #expect(disk["mode"] as? String == "offline", "\(target): \(disk)")
            #expect(disk["kind"] as? String == "incremental", "\(target): \(disk)")
            #expect(disk["bytes-copied"] as? Int == 64 << 10, "\(target): \(disk)")
            #expect(disk["checkpoint"] as? String == fifth, "\(target): \(disk)")
        }
        #expect(try libvirt.checkpoints(s.domain) == [fifth])
        try s.start()
        let live = try s.backup(during: {
            try s.write(0xa5, at: 0, length: 64 << 10, disk: "vda")
            try s.write(0xb5, at: 0, length: 64 << 10, disk: "vdb")
        })
        for (target, disk) in s.byDisk(live) {
            #expect(disk["mode"] as? String == "libvirt", "\(target): \(disk)")
            #expect(disk["kind"] as? String == "incremental", "\(target): \(disk)")
        }
        #expect(try s.layers("vda").count == 7)
        #expect(try s.layers("vdb").count == 6)
        // Every point of both disks restores byte-exact to the moment its job began: the
        // writes made during each job are in neither disk's layer of that job.
        try s.checkEveryPoint()
        try s.checkNothingLeft()
        let listed = try JSONHelpers.parse(try QBackupBinary.run(["list", s.repository("vdb"), "--output", "json"]).stdout)
            as? [String: Any] ?? [:]
        #expect((listed["source"] as? [String: Any])?["disk"] as? String == "vdb", "\(listed)")
    }

    /// A DIR that is one disk's repository, asked to take several disks: refused, and nothing
    /// in DIR or libvirt changes.
    func aOneDiskRepositoryRefusesSeveralDisks(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-onedir", targets: ["vda", "vdb"])
        try s.write(0x31, at: 0, length: 1 << 20, disk: "vda")
        try s.start()
        let one = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo,
                                         "--disk", "vda", "--output", "json"])
        #expect(one.status == 0, "\(one.stderr)")
        let json = try JSONHelpers.parse(one.stdout) as? [String: Any] ?? [:]
        #expect(json["kind"] as? String == "full", "one disk reports as before: \(json)")
        #expect(FileManager.default.fileExists(atPath: s.repo + "/manifest.json"), "one disk: DIR itself")
        let checkpoints = try libvirt.checkpoints(s.domain)
        #expect(checkpoints.count == 1)
        func snapshot() throws -> [String: Data] {
            var files: [String: Data] = [:]
            for name in try FileManager.default.contentsOfDirectory(atPath: s.repo) {
                files[name] = try Data(contentsOf: URL(fileURLWithPath: s.repo + "/" + name))
            }
            return files
        }
        let before = try snapshot()
        for extra in [[], ["--disk", "vda", "--disk", "vdb"]] {
            let refused = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo] + extra)
            #expect(refused.status == 1, "\(extra): \(refused.stderr)")
            #expect(refused.stderr.contains("qbackup: error: \(s.repo) is the repository of one disk; it cannot take several (vda, vdb)"),
                    "\(extra): \(refused.stderr)")
            #expect(try snapshot() == before, "\(extra): nothing in DIR changed")
            #expect(try libvirt.checkpoints(s.domain) == checkpoints)
            #expect(try !s.hasJob())
        }
        try s.checkNothingLeft()
    }

    /// kill -9 of a two-disk backup while its job runs (held before its first read): no layer
    /// is recorded in either repository; the next run aborts the job, drops the checkpoint the
    /// killed run made and takes both disks incrementally from their checkpoint; nothing lost.
    func aKilledTwoDiskBackupIsFinishedByTheNextRun(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-two-kill", targets: ["vda", "vdb"])
        try s.write(0x41, at: 0, length: 1 << 20, disk: "vda")
        try s.write(0x42, at: 0, length: 1 << 20, disk: "vdb")
        try s.start()
        try s.backup()
        let kept = try #require(try s.layers("vda").last?["checkpoint"] as? String)
        try s.write(0x43, at: 2 << 20, length: 64 << 10, disk: "vda")
        try s.write(0x44, at: 3 << 20, length: 128 << 10, disk: "vdb")

        let run = try RunningQBackup(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo],
                                     held: true, directory: s.dir)
        #expect(s.waitForJob(while: run), "the backup job never appeared")
        run.kill()
        _ = run.wait()
        #expect(try s.hasJob(), "the killed run's job should still be there")
        #expect(try libvirt.checkpoints(s.domain).count == 2, "the killed run made a checkpoint")
        #expect(try s.layers("vda").count == 1 && s.layers("vdb").count == 1, "the killed run recorded no layer")

        let next = try s.backup()
        let disks = s.byDisk(next)
        #expect(disks["vda"]?["kind"] as? String == "incremental", "\(next)")
        #expect(disks["vda"]?["bytes-copied"] as? Int == 64 << 10, "\(next)")
        #expect(disks["vdb"]?["kind"] as? String == "incremental", "\(next)")
        #expect(disks["vdb"]?["bytes-copied"] as? Int == 128 << 10, "\(next)")
        let warnings = (next["warnings"] as? [String] ?? []).joined(separator: "\n")
        #expect(warnings.contains("aborted the backup job an interrupted run"), "\(next)")
        let newest = try #require(disks["vda"]?["checkpoint"] as? String)
        #expect(newest != kept)
        #expect(disks["vdb"]?["checkpoint"] as? String == newest)
        #expect(try libvirt.checkpoints(s.domain) == [newest])
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }

    /// A disk that fails: no layer of that job is recorded in either repository and the
    /// checkpoint the job made is deleted. Before the job (vdb's repository is another disk's:
    /// vda's engine, already holding its repository, stops too and no job begins) and during it
    /// (the job aborted under the held run, so both exports go: neither layer is recorded).
    /// The next run goes on incrementally; every point restores.
    func aFailedDiskRecordsNoLayerOfTheJob(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-two-fail", targets: ["vda", "vdb"])
        try s.write(0x51, at: 0, length: 1 << 20, disk: "vda")
        try s.write(0x52, at: 0, length: 1 << 20, disk: "vdb")
        try s.start()
        try s.backup()
        let kept = try libvirt.checkpoints(s.domain)
        #expect(kept.count == 1)
        try s.write(0x53, at: 2 << 20, length: 64 << 10, disk: "vda")
        try s.write(0x54, at: 3 << 20, length: 64 << 10, disk: "vdb")

        // Before the job: DIR/vdb made another disk's repository.
        let vdb = s.repository("vdb")
        let aside = s.dir.file("vdb-aside")
        try FileManager.default.moveItem(atPath: vdb, toPath: aside)
        let other = s.dir.file("other.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", other, "\(s.size)")
        #expect(try QBackupBinary.run(["backup", other, "--repo", vdb]).status == 0)
        let refused = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo])
        #expect(refused.status == 1, "\(refused.stderr)")
        #expect(refused.stderr.contains("belongs to another disk"), "\(refused.stderr)")
        #expect(try s.layers("vda").count == 1, "vda's layer of a job that never began is not recorded")
        #expect(try libvirt.checkpoints(s.domain) == kept)
        #expect(try !s.hasJob())
        try FileManager.default.removeItem(atPath: vdb)
        try FileManager.default.moveItem(atPath: aside, toPath: vdb)

        // During the job, one disk: vdb's repository says its disk was larger, which its engine
        // finds once the job's export is up (the disk "shrank"); vda's layer is written by then
        // and must not be recorded either.
        let manifest = vdb + "/manifest.json"
        let original = try Data(contentsOf: URL(fileURLWithPath: manifest))
        var edited = try #require(try JSONSerialization.jsonObject(with: original) as? [String: Any])
        edited["virtual-size"] = s.size * 2
        try JSONSerialization.data(withJSONObject: edited).write(to: URL(fileURLWithPath: manifest))
        let shrank = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo])
        #expect(shrank.status == 1, "\(shrank.stderr)")
        #expect(shrank.stderr.contains("shrank"), "\(shrank.stderr)")
        #expect(try s.layers("vda").count == 1, "vda's layer of the failed job is not recorded")
        #expect(try libvirt.checkpoints(s.domain) == kept, "the failed job's checkpoint is deleted")
        #expect(try !s.hasJob())
        try original.write(to: URL(fileURLWithPath: manifest))

        // During the job: aborted while the run is held before its first read.
        let run = try RunningQBackup(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo],
                                     held: true, directory: s.dir)
        #expect(s.waitForJob(while: run), "the backup job never appeared")
        #expect(try libvirt.checkpoints(s.domain).count == 2, "the job made a checkpoint")
        try libvirt.must(["domjobabort", s.domain])
        // libvirt ends the job (and its export) after domjobabort returns, once QEMU's block jobs
        // are cancelled: the run goes on only when the job is gone, as the scenario says.
        let deadline = Date().addingTimeInterval(30)
        while try s.hasJob(), Date() < deadline { usleep(10_000) }
        #expect(try !s.hasJob(), "the aborted job never ended")
        let failed = run.wait()
        #expect(failed.status != 0, "\(failed.stderr)")
        #expect(failed.stderr.contains("qbackup: error:"), "\(failed.stderr)")
        #expect(try s.layers("vda").count == 1 && s.layers("vdb").count == 1, "no layer of the failed job is recorded")
        #expect(try libvirt.checkpoints(s.domain) == kept, "the failed job's checkpoint is deleted")
        #expect(try !s.hasJob())

        // After every disk's layer is written, before they are recorded: the job aborted from
        // outside. What was read may postdate the point in time, so nothing is recorded.
        let hold = s.dir.file("written.release")
        let late = try RunningQBackup(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo],
                                      environment: ["QBACKUP_DEBUG_LIBVIRT_WRITTEN_HOLD": hold], directory: s.dir)
        let reachedBy = Date().addingTimeInterval(60)
        while !FileManager.default.fileExists(atPath: hold + ".reached"), late.isRunning, Date() < reachedBy { usleep(10_000) }
        #expect(FileManager.default.fileExists(atPath: hold + ".reached"), "the run never wrote its layers")
        try libvirt.must(["domjobabort", s.domain])
        let gone = Date().addingTimeInterval(30)
        while try s.hasJob(), Date() < gone { usleep(10_000) }
        FileManager.default.createFile(atPath: hold, contents: nil)
        let ended = late.wait()
        #expect(ended.status != 0, "\(ended.stderr)")
        #expect(ended.stderr.contains("the backup job ended before every disk was read"), "\(ended.stderr)")
        #expect(try s.layers("vda").count == 1 && s.layers("vdb").count == 1, "no layer of the aborted job is recorded")
        #expect(try libvirt.checkpoints(s.domain) == kept, "the aborted job's checkpoint is deleted")
        #expect(try !s.hasJob())

        let next = try s.backup()
        let disks = s.byDisk(next)
        #expect(disks["vda"]?["kind"] as? String == "incremental", "\(next) \(s.stderr)")
        #expect(disks["vda"]?["bytes-copied"] as? Int == 64 << 10, "\(next)")
        #expect(disks["vdb"]?["kind"] as? String == "incremental", "\(next)")
        #expect(disks["vdb"]?["bytes-copied"] as? Int == 64 << 10, "\(next)")
        #expect(try libvirt.checkpoints(s.domain).count == 1)
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }
}
