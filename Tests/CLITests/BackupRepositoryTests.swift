import Foundation
import Testing
import TestSupport

/// Errors about the repository folder say what is wrong in words (issue 11, weak spots), and
/// files in it that the repository does not own are never touched (issue 11 item 6).
@Suite struct BackupRepositoryTests {
    /// SHA-256 of a file.
    static func sha256(_ path: String) throws -> String {
        String(try Tools.run("sha256sum", [path]).stdout.prefix(64))
    }

    /// Issue 11 item 6: a qemu-img image named like a layer and a `*.partial` file of the user
    /// in the repository folder survive three backups, a merge and a merge that has nothing to
    /// merge, byte-identical; verify names them as foreign and still passes.
    @Test func foreignFilesInTheFolderAreNeverTouched() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "64M")
        try FileManager.default.createDirectory(atPath: repo, withIntermediateDirectories: false)
        let lookalike = repo + "/full-20250101T000000Z.qcow2"
        let partial = repo + "/x.qcow2.partial"
        try Tools.qemuImg("create", "-q", "-f", "qcow2", lookalike, "16M")
        try Tools.qemuIO(lookalike, format: "qcow2", ["write -P 7 0 1M"])
        try Data(repeating: 0x42, count: 70_000).write(to: URL(fileURLWithPath: partial))
        let expected = [lookalike: try Self.sha256(lookalike), partial: try Self.sha256(partial)]
        func expectUntouched(_ step: String) throws {
            for (path, digest) in expected {
                let now = FileManager.default.fileExists(atPath: path) ? try Self.sha256(path) : "missing"
                #expect(now == digest,
                        "\(step) changed or removed \((path as NSString).lastPathComponent)")
            }
        }
        for round in 0..<3 {
            try Tools.qemuIO(disk, format: "qcow2", ["write -P \(round + 1) \(round * 4)M 1M"])
            let out = try QBackupBinary.run(["backup", disk, "--repo", repo])
            #expect(out.status == 0, "backup \(round): \(out.stderr)")
            try expectUntouched("backup \(round)")
        }
        let merge = try QBackupBinary.run(["merge", repo, "--keep", "1"])
        #expect(merge.status == 0, "\(merge.stderr)")
        try expectUntouched("merge")
        let nothing = try QBackupBinary.run(["merge", repo, "--keep", "1"])
        #expect(nothing.status == 0 && nothing.stdout.contains("nothing to merge"), "\(nothing.stdout)\(nothing.stderr)")
        try expectUntouched("a merge with nothing to merge")
        let verify = try QBackupBinary.run(["verify", repo])
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
        for path in expected.keys {
            let name = (path as NSString).lastPathComponent
            #expect(verify.stderr.contains("qbackup: warning: \(name) is not a file of this repository"), "\(verify.stderr)")
        }
        try expectUntouched("verify")
    }

    /// `--repo` below a regular file: one error line naming the file that is not a folder,
    /// not "NSCocoaErrorDomain error 512".
    @Test func repositoryBelowARegularFile() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "1M")
        FileManager.default.createFile(atPath: dir.file("plain"), contents: Data("x".utf8))
        let result = try QBackupBinary.run(["backup", disk, "--repo", dir.file("plain/sub/repo")])
        #expect(result.status == 1 && result.failedCleanly, "exit \(result.status): \(result.stderr)")
        #expect(result.stderr.contains("\(dir.file("plain")) is a file, not a folder"), "\(result.stderr)")
        #expect(!result.stderr.contains("NSCocoaErrorDomain"), "\(result.stderr)")
    }

    // MARK: - The top folder of a libvirt backup of several disks

    /// A group's top folder as `backup --libvirt` of two disks leaves it: DIR/vda and DIR/vdb
    /// (ordinary repositories, here of two image files) and DIR/libvirt-group.json, no manifest.
    static func groupTop(_ dir: TempDir) throws -> String {
        let top = dir.file("group")
        for target in ["vda", "vdb"] {
            let disk = dir.file("\(target).qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "4M")
            try Tools.qemuIO(disk, format: "qcow2", ["write -P 5 0 64k"])
            let out = try QBackupBinary.run(["backup", disk, "--repo", "\(top)/\(target)"])
            #expect(out.status == 0, "backup of \(target): \(out.stderr)")
        }
        try Data(#"{"version":1,"id":"0123456789abcdef","domain-uuid":"5b1c3b0a-9d6e-4f4e-8a35-2f0c4b7e9a11","sequence":1}"#.utf8)
            .write(to: URL(fileURLWithPath: "\(top)/libvirt-group.json"))
        return top
    }

    /// Every file below `folder` (relative name: SHA-256, "dir" or "link"), to show nothing was written.
    static func tree(_ folder: String) throws -> [String: String] {
        var files: [String: String] = [:]
        let items = FileManager.default.enumerator(atPath: folder)
        while let name = items?.nextObject() as? String {
            let path = "\(folder)/\(name)"
            let kind = try FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType
            files[name] = kind == .typeDirectory ? "dir" : kind == .typeSymbolicLink ? "link" : try sha256(path)
        }
        return files
    }

    /// `list` on a group's top folder lists each disk's repository (its target, its path and
    /// what `list DIR/<target>` shows), human and JSON, exit 0 — not an empty repository.
    @Test func listOnAGroupTopListsEachDisk() throws {
        let dir = TempDir()
        let top = try Self.groupTop(dir)
        let before = try Self.tree(top)
        let human = try QBackupBinary.run(["list", top])
        #expect(human.status == 0, "\(human.stderr)")
        #expect(!human.stdout.contains("holds no backup"), "\(human.stdout)")
        #expect(human.stdout.hasPrefix("\(top) holds the repositories of 2 disk(s) of a libvirt backup:\n"), "\(human.stdout)")
        for target in ["vda", "vdb"] {
            let alone = try QBackupBinary.run(["list", "\(top)/\(target)"])
            #expect(alone.status == 0, "\(alone.stderr)")
            #expect(human.stdout.contains("\n\(target): " + alone.stdout), "\(human.stdout)\n---\n\(alone.stdout)")
        }
        let json = try QBackupBinary.run(["list", top, "--output", "json"])
        #expect(json.status == 0, "\(json.stderr)")
        let object = try JSONHelpers.parse(json.stdout) as? [String: Any]
        let disks = object?["disks"] as? [[String: Any]] ?? []
        #expect(disks.map { $0["disk"] as? String } == ["vda", "vdb"], "\(json.stdout)")
        for entry in disks {
            let target = entry["disk"] as? String ?? "?"
            #expect(entry["repository"] as? String == "\(top)/\(target)")
            let alone = try JSONHelpers.parse(try QBackupBinary.run(["list", "\(top)/\(target)", "--output", "json"]).stdout) as? [String: Any]
            #expect((entry["layers"] as? [Any])?.count == 1, "\(entry)")
            #expect(entry["id"] as? String == alone?["id"] as? String && entry["id"] != nil, "\(entry)")
            #expect((entry["layers"] as? [[String: Any]])?.first?["sha256"] as? String
                    == (alone?["layers"] as? [[String: Any]])?.first?["sha256"] as? String)
        }
        #expect(try Self.tree(top) == before, "list wrote into the group")
    }

    /// Every other repository command given a group's top folder refuses it with one line naming
    /// the disks' repositories, exit 1, and writes nothing (not even a lock file), in DIR or elsewhere.
    @Test func groupTopIsRefusedByEveryRepositoryCommand() throws {
        let dir = TempDir()
        let top = try Self.groupTop(dir)
        let stream = dir.file("vda.stream")
        let send = try Tools.run("sh", ["-c", "'\(try QBackupBinary.path())' send '\(top)/vda' > '\(stream)'"])
        #expect(send.status == 0, "\(send.stderr)")
        let before = try Self.tree(top)
        let expected = "qbackup: error: \(top) holds the repositories of several disks (vda, vdb); name one: \(top)/vda"
        let bin = try QBackupBinary.path()
        let commands: [[String]] = [
            ["backup", dir.file("vda.qcow2"), "--repo", top],
            ["backup", dir.file("vda.qcow2"), "--repo", top, "--dry-run"],
            ["backup", "--qmp", dir.file("no-such.qmp"), "--repo", top],
            ["backup", "--nbd", "nbd+unix:///vda?socket=\(dir.file("no-such.sock"))", "--repo", top],
            ["merge", top, "--keep", "1"],
            ["verify", top],
            ["restore", top, "--to", dir.file("restored.qcow2")],
            ["repair", top],
            ["repair", top, "--yes"],
            ["send", top],
            ["replicate", top, dir.file("replica")],
            ["replicate", "\(top)/vda", top],
        ]
        var runs = try commands.map { ($0.joined(separator: " "), try QBackupBinary.run($0)) }
        runs.append(("receive < stream", try Tools.run("sh", ["-c", "'\(bin)' receive '\(top)' < '\(stream)'"])))
        for (command, out) in runs {
            #expect(out.status == 1 && out.failedCleanly, "\(command): exit \(out.status): \(out.stderr)")
            #expect(out.errorLines == [Substring(expected)], "\(command): \(out.stderr)")
            #expect(out.stdout.isEmpty, "\(command): \(out.stdout)")
        }
        #expect(try Self.tree(top) == before, "a refused command wrote into the group")
        for made in ["restored.qcow2", "replica"] {
            #expect(!FileManager.default.fileExists(atPath: dir.file(made)), "\(made) was made")
        }
    }

    /// A group record that is a symbolic link (or not a regular file) is not trusted: one error
    /// line naming it, for list and the other commands, and nothing written. A record that is not
    /// JSON still keeps the folder from being taken for an empty repository.
    @Test func badGroupRecordIsOneErrorAndNoWrite() throws {
        let dir = TempDir()
        let top = try Self.groupTop(dir)
        let record = "\(top)/libvirt-group.json"
        let elsewhere = dir.file("record.json")
        try FileManager.default.moveItem(atPath: record, toPath: elsewhere)
        try FileManager.default.createSymbolicLink(atPath: record, withDestinationPath: elsewhere)
        var before = try Self.tree(top)
        for command in [["list", top], ["list", top, "--output", "json"], ["backup", dir.file("vda.qcow2"), "--repo", top],
                        ["merge", top, "--keep", "1"], ["verify", top]] {
            let out = try QBackupBinary.run(command)
            #expect(out.status == 1 && out.failedCleanly, "\(command): exit \(out.status): \(out.stderr)")
            #expect(out.errorLines == ["qbackup: error: \(record): not a regular file (a group record is never read through a symbolic link)"],
                    "\(command): \(out.stderr)")
        }
        #expect(try Self.tree(top) == before, "a command wrote into the group")
        try FileManager.default.removeItem(atPath: record)
        try Data("not json\n".utf8).write(to: URL(fileURLWithPath: record))
        before = try Self.tree(top)
        let backup = try QBackupBinary.run(["backup", dir.file("vda.qcow2"), "--repo", top])
        #expect(backup.status == 1 && backup.failedCleanly, "exit \(backup.status): \(backup.stderr)")
        #expect(backup.stderr.contains("holds the repositories of several disks (vda, vdb)"), "\(backup.stderr)")
        #expect(try Self.tree(top) == before, "backup wrote into the group")
    }

    /// A replica over ssh, or `send --have` the listing of a group's top folder: the other side's
    /// `list --output json` is of several disks, so one error line naming them, nothing sent
    /// and nothing written.
    @Test func replicateOverSSHIntoAGroupTopIsRefused() throws {
        let dir = TempDir()
        let top = try Self.groupTop(dir)
        let before = try Self.tree(top)
        let listing = dir.file("group-listing.json")
        let list = try QBackupBinary.run(["list", top, "--output", "json"])
        #expect(list.status == 0, "\(list.stderr)")
        try Data(list.stdout.utf8).write(to: URL(fileURLWithPath: listing))
        let send = try QBackupBinary.run(["send", "\(top)/vda", "--have", listing])
        #expect(send.status == 1 && send.failedCleanly, "exit \(send.status): \(send.stderr)")
        #expect(send.errorLines == ["qbackup: error: \(listing): the folder holds the repositories of several disks (vda, vdb); name one of them"],
                "\(send.stderr)")
        #expect(send.stdout.isEmpty, "send wrote \(send.stdout.utf8.count) bytes of a stream")

        let server = try SSHServer()
        defer { server.stop() }
        let url = "ssh://\(server.destination)\(top)"
        let out = try QBackupBinary.run(["replicate", "\(top)/vda", url, "--ssh-command", server.sshCommand,
                                         "--remote-qbackup", try QBackupBinary.path()])
        #expect(out.status == 1 && out.failedCleanly, "exit \(out.status): \(out.stderr)")
        #expect(out.stderr.contains("holds the repositories of several disks (vda, vdb); name one"), "\(out.stderr)")
        #expect(try Self.tree(top) == before, "replicate wrote into the group")
    }
}
