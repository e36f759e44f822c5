import Foundation
import Testing
import TestSupport

/// Options every command shares.
@Suite struct GlobalOptionsTests {
    /// --quiet: a cron job's night prints nothing when all is well, and errors still reach stderr.
    @Test func quietSilencesSummariesNotErrors() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "16M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 1 0 1M"])
        let runs: [[String]] = [
            ["backup", disk, "--repo", repo, "--quiet"],
            ["backup", disk, "--repo", repo, "-q"],
            ["verify", repo, "--image", disk, "--quiet"],
            ["restore", repo, "--to", dir.file("out.qcow2"), "--quiet"],
            ["merge", repo, "--keep", "1", "--quiet"],
            ["create", dir.file("new.qcow2"), "1M", "--quiet"],
        ]
        for args in runs {
            let result = try QBackupBinary.run(args)
            #expect(result.status == 0, "\(args): \(result.stderr)")
            #expect(result.stdout.isEmpty && result.stderr.isEmpty, "\(args): '\(result.stdout)' '\(result.stderr)'")
        }
        // Without --quiet the same night says what it did.
        let loud = try QBackupBinary.run(["backup", disk, "--repo", repo])
        #expect(loud.status == 0 && loud.stdout.contains("backup: layer"), "\(loud.stdout)")
        // An error is never silenced.
        let failed = try QBackupBinary.run(["backup", dir.file("missing.qcow2"), "--repo", repo, "--quiet"])
        #expect(failed.status != 0)
        #expect(failed.stderr.hasPrefix("qbackup: error:"), "\(failed.stderr)")
    }
}

/// `-U/--force-share` (DESIGN "Damaged images"): the read-only commands read an image that
/// qemu-nbd or a VM holds, with a warning; without it the refusal names the holder and -U.
@Suite struct ForceShareTests {
    /// A holder of the image, started on it, and the name the error must give it.
    enum Holder: String, CaseIterable, CustomStringConvertible {
        case qemuNBD = "writable qemu-nbd", vm = "qemu-system -S"
        var description: String { rawValue }
    }

    @Test(arguments: Holder.allCases)
    func readOnlyCommandsReadAnImageQemuHolds(holder: Holder) throws {
        let dir = TempDir()
        let disk = dir.file("busy.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "8M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x5a 0 192k", "write -z 1M 64k"])
        try Tools.qemuImg("bitmap", "--add", disk, "b1")
        let expected = try Tools.run("qemu-img", ["map", "--output=json", disk]).stdout

        var nbd: QemuNBD?
        var vm: QemuVM?
        defer {
            nbd?.stop()
            vm?.stop()
        }
        let name: String
        switch holder {
        case .qemuNBD:
            nbd = try QemuNBD(image: disk, bitmap: nil, directory: dir, readOnly: false)
            name = "qemu-nbd (pid "
        case .vm:
            let started = try QemuVM(disk: disk, directory: dir)
            vm = started
            name = "a VM (qemu-system-x86_64, pid \(started.pid))"
        }

        // Locked: exit 75, one error line naming the holder and -U, no raw lock byte offset.
        for args in [["info", disk], ["bitmap", "list", disk], ["map", disk]] {
            let r = try QBackupBinary.run(args)
            #expect(r.status == 75 && r.failedCleanly, "\(holder) \(args): \(r.status) \(r.stderr)")
            #expect(r.stderr.contains(name), "\(holder) \(args): \(r.stderr)")
            #expect(r.stderr.contains("-U/--force-share"), "\(holder) \(args): \(r.stderr)")
            #expect(!r.stderr.contains("offset 0x") && !r.stderr.contains("lock byte"), "\(holder) \(args): \(r.stderr)")
        }
        // A writing command is refused the same way (-U does not exist there).
        let add = try QBackupBinary.run(["bitmap", "add", disk, "b2"])
        #expect(add.status == 75 && add.stderr.contains(name), "\(holder): \(add.stderr)")
        #expect(try QBackupBinary.run(["bitmap", "add", "-U", disk, "b2"]).status != 0)

        // With -U every read-only command reads it, with one warning that the data may be changing.
        let out = dir.file("flat.qcow2")
        let runs: [[String]] = [
            ["info", "-U", disk], ["map", "-U", "--output", "json", disk], ["bitmap", "list", "--force-share", disk],
            ["bitmap", "dump", "-U", disk, "b1"], ["check", "-U", disk], ["compare", "-U", disk, disk],
            ["flatten", "-U", disk, out],
        ]
        for args in runs {
            let r = try QBackupBinary.run(args)
            #expect(r.status == 0, "\(holder) \(args): \(r.stderr)")
            // (bitmap dump also warns that b1 is in_use: QEMU holds it open.)
            let warnings = r.stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: warning: ") && $0.contains("-U/--force-share") }
            #expect(warnings.count == 1, "\(holder) \(args): \(r.stderr)")
            #expect(warnings.first.map { $0.contains(name) && $0.contains("changing") } == true, "\(holder) \(args): \(r.stderr)")
            if args[0] == "map" {
                #expect(JSONHelpers.canonical(try JSONHelpers.mergedMap(r.stdout)) == JSONHelpers.canonical(try JSONHelpers.mergedMap(expected)),
                        "\(holder): ours\n\(r.stdout)\nqemu-img's\n\(expected)")
            }
        }
        // --repair writes: -U is refused with it.
        #expect(try QBackupBinary.run(["check", "-U", "--repair", "all", disk]).status == 2)
        try Tools.qemuIO(out, format: "qcow2", ["read -P 0x5a 0 192k", "read -P 0 192k 1M"])
    }
}
