import Foundation
import Testing
import TestSupport

/// `qbackup replicate` (issue 16): to a local folder, and over ssh to 127.0.0.1 through a real
/// sshd (Tests/TestSupport/SSHServer.swift) with the built binary as the remote qbackup.
@Suite struct ReplicatorTests {
    static func replicate(_ s: BackupScenario, _ destination: String, _ extra: [String] = []) throws -> Tools.Result {
        try QBackupBinary.run(["replicate", s.repo, destination, "--output", "json"] + extra)
    }

    static func report(_ r: Tools.Result) -> [String: Any] {
        ((try? JSONHelpers.parse(r.stdout)) as? [String: Any]) ?? [:]
    }

    @Test func overSSHFirstCopyThenOnlyTheNewNight() throws {
        let s = try ReplicationTests.source(seed: 70)
        let server = try SSHServer()
        defer { server.stop() }
        let binary = try QBackupBinary.path()
        let remote = s.dir.file("offsite/srv/vm")  // neither folder exists yet: it lists as empty
        let url = "ssh://\(server.destination)\(remote)"
        let ssh = ["--ssh-command", server.sshCommand, "--remote-qbackup", binary]
        let first = try Self.replicate(s, url, ssh + ["--progress"])
        #expect(first.status == 0, "\(first.stderr)")
        #expect(Self.report(first)["layers-sent"] as? [Int] == [0, 1, 2, 3], "\(first.stdout)")
        // Progress on stderr (not a terminal here: plain lines with the rate).
        #expect(first.stderr.contains("replicate: ") && first.stderr.contains("/s"), "\(first.stderr)")
        #expect(try ReplicationTests.layerFiles(remote) == ReplicationTests.layerFiles(s.repo))
        try s.expectKeeps([0, 1, 2, 3], in: remote, step: "over ssh")

        // The next night: only its layer goes over the connection.
        try s.dirty(writes: 3, maxOffset: 40 << 20)
        let layer = try s.backup()
        let night = try Self.replicate(s, url, ssh)
        #expect(night.status == 0, "\(night.stderr)")
        let report = Self.report(night)
        #expect(report["layers-sent"] as? [Int] == [layer["index"] as? Int ?? -1], "\(night.stdout)")
        let size = try ReplicationTests.fileSize("\(s.repo)/\(layer["layer"] as? String ?? "")")
        #expect((report["stream-bytes"] as? Int ?? .max) <= Int(size) + 4096, "\(night.stdout)")
        #expect(report["file-bytes"] as? Int == Int(size))
        try s.expectKeeps([0, 1, 2, 3, 4], in: remote, step: "the next night over ssh")

        // The port in the URL, an ssh command without one; up to date: nothing sent.
        let noPort = "ssh -i \(server.keyFile) -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes"
        let again = try Self.replicate(s, server.url(remote), ["--ssh-command", noPort, "--remote-qbackup", binary])
        #expect(again.status == 0, "\(again.stderr)")
        #expect(Self.report(again)["up-to-date"] as? Bool == true, "\(again.stdout)")

        // A remote folder that is a repository of its own is refused, and left as it was.
        let other = try BackupScenario(size: "8M", seed: 71)
        try other.dirty(writes: 2, maxOffset: 4 << 20)
        try other.backup()
        let before = try BackupScenario.digests(other.repo)
        let refused = try Self.replicate(s, "ssh://\(server.destination)\(other.repo)", ssh)
        #expect(refused.failedCleanly && refused.stderr.contains("not a replica"), "\(refused.stderr)")
        #expect(try BackupScenario.digests(other.repo) == before)
        // A remote qbackup that is not there: the remote side's reason in one error line.
        let missing = try Self.replicate(s, url, ["--ssh-command", server.sshCommand, "--remote-qbackup", "/nonexistent/qbackup"])
        #expect(missing.failedCleanly && missing.stderr.contains("remote 'list' failed"), "\(missing.stderr)")
    }

    @Test func toALocalFolder() throws {
        let s = try ReplicationTests.source(seed: 72)
        let dst = s.dir.file("copy")
        let r = try Self.replicate(s, dst)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try ReplicationTests.layerFiles(dst) == ReplicationTests.layerFiles(s.repo))
        try s.dirty(writes: 2, maxOffset: 40 << 20)
        try s.backup()
        let next = try Self.replicate(s, dst)
        #expect(Self.report(next)["layers-sent"] as? [Int] == [4], "\(next.stdout)\(next.stderr)")
        try s.expectKeeps([0, 1, 2, 3, 4], in: dst, step: "local replicate")
        // A source that is not there: its own error, and nothing made at DEST.
        let missing = try QBackupBinary.run(["replicate", s.dir.file("nothing"), s.dir.file("dst2")])
        #expect(missing.failedCleanly && missing.stderr.contains("no such repository folder"), "\(missing.stderr)")
        #expect(!FileManager.default.fileExists(atPath: s.dir.file("dst2")))
    }

    /// Issue 16 item D over ssh: after `merge --keep 2` and one more night at the source, one
    /// replicate through a real sshd sends the fold and the new layer; the remote replica then
    /// lists exactly the source's records, holds its files, and restores every point.
    @Test func aMergeAtTheSourceOverSSH() throws {
        let s = try ReplicationTests.nights(seed: 73)
        let server = try SSHServer()
        defer { server.stop() }
        let binary = try QBackupBinary.path()
        let remote = s.dir.file("offsite/vm")
        let url = "ssh://\(server.destination)\(remote)"
        let ssh = ["--ssh-command", server.sshCommand, "--remote-qbackup", binary]
        let first = try Self.replicate(s, url, ssh)
        #expect(first.status == 0, "\(first.stderr)")
        try s.qbackup(["merge", s.repo, "--keep", "2"])
        try s.dirty(writes: 2, maxOffset: 4 << 20)
        try s.backup()
        let r = try Self.replicate(s, url, ssh)
        #expect(r.status == 0, "replicate over ssh after a merge: \(r.stderr)")
        #expect(Self.report(r)["layers-sent"] as? [Int] == [3, 5] && Self.report(r)["folds-sent"] as? [Int] == [3], "\(r.stdout)")
        #expect(try ReplicationTests.listedLayers(remote).map { JSONHelpers.canonical($0) }
                == ReplicationTests.listedLayers(s.repo).map { JSONHelpers.canonical($0) })
        #expect(try ReplicationTests.layerFiles(remote) == ReplicationTests.layerFiles(s.repo))
        try s.expectKeeps([3, 4, 5], in: remote, step: "over ssh after a merge")
    }
}
