import Foundation
import Testing
import TestSupport

/// `qbackup backup --libvirt` (the real binary) against a real libvirtd and a paused TCG
/// domain: checkpoints and pull-mode backup, writes during each job, every point restored
/// byte-exact, and libvirt left holding only the checkpoint the repository needs.
/// One libvirtd for the whole suite (its start costs seconds).
@Suite(.serialized) struct LibvirtBackupTests {
    @Test func liveBackupsThroughLibvirt() throws {
        let libvirt = try LibvirtDaemon()
        defer { libvirt.stop() }
        try fullAndIncrementalsWithWritesDuringEachBackup(libvirt)
        try aShutOffDomainIsBackedUpFromItsDiskIntoTheSameChain(libvirt)
        try routineMessagesAreNotesNotWarnings(libvirt)
        try anOfflineRepositoryOfTheDiskContinuesAsALibvirtOne(libvirt)
    }

    /// A remote host: `qemu+ssh://root@127.0.0.1:PORT/system` through a real sshd (SSHServer), the
    /// export read over TCP on 127.0.0.1 (libvirt picks the port). libvirt's plain ssh transport
    /// takes `keyfile` (ssh -i) and `no_verify`, not `known_hosts` (libssh/libssh2 only): the host
    /// key is checked against the fixture's known_hosts by a `command=` wrapper, and nothing is
    /// written to ~/.ssh. A full and an incremental with writes during each job restore
    /// byte-exact; a shut-off remote domain is refused clearly (its file is on the other host).
    @Test func aRemoteHostThroughSSHWithNBDOverTCP() throws {
        let libvirt = try LibvirtDaemon()
        defer { libvirt.stop() }
        let sshd = try SSHServer()
        defer { sshd.stop() }
        let s = try LibvirtScenario(libvirt, "lv-remote")
        let wrapper = s.dir.file("ssh-checked")
        try """
            #!/bin/sh
            exec ssh -o UserKnownHostsFile=\(sshd.knownHostsFile) -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes \\
                -o BatchMode=yes -o ConnectTimeout=10 "$@"

            """.write(toFile: wrapper, atomically: true, encoding: .utf8)
        chmod(wrapper, 0o755)
        let uri = "qemu+ssh://\(sshd.user)@\(sshd.host):\(sshd.port)/system?keyfile=\(sshd.keyFile)&command=\(wrapper)"
        s.connect = uri
        try s.write(0x71, at: 0, length: 1 << 20)
        try s.start()
        var jobXML = ""
        let full = try s.backup(during: {
            try s.write(0x72, at: 128 << 10, length: 64 << 10)
            jobXML = try libvirt.must(["backup-dumpxml", s.domain]).stdout
        })
        #expect(full["kind"] as? String == "full", "\(full) \(s.stderr)")
        // The export was NBD over TCP on the URI's host, on the port libvirt picked.
        #expect(jobXML.contains("transport='tcp'") && jobXML.contains("name='127.0.0.1'") && jobXML.contains("port='"),
                "\(jobXML)")
        #expect(full["mode"] as? String == "libvirt", "\(full)")
        let incremental = try s.backup(during: { try s.write(0x73, at: 6 << 20, length: 64 << 10) })
        #expect(incremental["kind"] as? String == "incremental", "\(incremental) \(s.stderr)")
        // The write of the full backup's window (the incremental's own is in the next layer).
        #expect(incremental["bytes-copied"] as? Int == 64 << 10, "\(incremental)")
        let newest = try #require(try s.layers().last?["checkpoint"] as? String)
        #expect(try libvirt.checkpoints(s.domain) == [newest])
        let listed = try JSONHelpers.parse(try QBackupBinary.run(["list", s.repo, "--output", "json"]).stdout)
            as? [String: Any] ?? [:]
        #expect((listed["source"] as? [String: Any])?["uri"] as? String == uri, "\(listed)")
        try s.checkEveryPoint()
        try s.checkNothingLeft()
        // libvirt really went through the sshd, with the key given by keyfile=.
        let log = (try? String(contentsOfFile: sshd.logFile, encoding: .utf8)) ?? ""
        #expect(log.contains("Accepted publickey for \(sshd.user)"), "\(log)")

        try s.destroy()
        let refused = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", uri, "--repo", s.repo])
        #expect(refused.status == 1, "\(refused.stderr)")
        #expect(refused.stderr.contains("qbackup: error: domain '\(s.domain)' is shut off and its disk file is on the host of"),
                "\(refused.stderr)")
        #expect(refused.stderr.contains("not reachable from here"), "\(refused.stderr)")
        #expect(try s.layers().count == 2, "the refusal wrote no layer")
    }

    func fullAndIncrementalsWithWritesDuringEachBackup(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-live")
        try s.write(0x11, at: 0, length: 1 << 20)
        try s.write(0x12, at: 5 << 20, length: 256 << 10)
        try s.start()

        var checkpoints: [String] = []
        for round in 0..<3 {
            let pattern = UInt8(0xa0 + round)
            let json = try s.backup(during: {
                try s.write(pattern, at: 64 << 10, length: 64 << 10)
                try s.write(pattern, at: (7 << 20) + round * (64 << 10), length: 64 << 10)
            })
            #expect(json["kind"] as? String == (round == 0 ? "full" : "incremental"), "\(json)")
            #expect(json["mode"] as? String == "libvirt", "\(json)")
            if round > 0 {
                // The incremental holds the writes of the window before it (two 64 KiB clusters).
                #expect(json["bytes-copied"] as? Int == 128 << 10, "\(json)")
            }
            let layers = try s.layers()
            let checkpoint = try #require(layers.last?["checkpoint"] as? String)
            checkpoints.append(checkpoint)
            // libvirt holds exactly the checkpoint the repository needs: the newest layer's.
            #expect(try libvirt.checkpoints(s.domain) == [checkpoint])
            try s.checkNothingLeft()
        }
        #expect(Set(checkpoints).count == 3, "each layer begins its own checkpoint: \(checkpoints)")
        // The writes of the last window are in the next layer.
        try s.write(0x77, at: 3 << 20, length: 64 << 10)
        let last = try s.backup()
        #expect(last["kind"] as? String == "incremental")
        #expect(last["bytes-copied"] as? Int == (128 + 64) << 10, "\(last)")
        #expect(try s.layers().map { $0["mode"] as? String } == Array(repeating: "libvirt", count: 4))
        try s.checkEveryPoint()

        // The repository records the domain by UUID, its disk and the URI, and no bitmap.
        let listed = try JSONHelpers.parse(try QBackupBinary.run(["list", s.repo, "--output", "json"]).stdout)
            as? [String: Any] ?? [:]
        let source = listed["source"] as? [String: Any] ?? [:]
        #expect(source["kind"] as? String == "libvirt")
        #expect(source["disk"] as? String == "vda")
        #expect(source["uri"] as? String == libvirt.uri)
        #expect((source["domain-uuid"] as? String).flatMap(UUID.init(uuidString:)) != nil)
        #expect(listed["bitmap"] is NSNull, "\(listed)")
    }

    /// Live, shut off (offline from the disk file: the changes since the last checkpoint, no new
    /// checkpoint, the same one recorded), started again, live incremental: every point restores.
    func aShutOffDomainIsBackedUpFromItsDiskIntoTheSameChain(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-mixed")
        try s.write(0x21, at: 0, length: 2 << 20)
        try s.start()
        let full = try s.backup(during: { try s.write(0x22, at: 1 << 20, length: 64 << 10) })
        #expect(full["kind"] as? String == "full")
        let first = try #require(try s.layers().last?["checkpoint"] as? String)

        try s.write(0x23, at: 4 << 20, length: 128 << 10)
        try s.destroy()
        try s.write(0x24, at: 6 << 20, length: 64 << 10)
        let offline = try s.backup()
        #expect(offline["kind"] as? String == "incremental", "\(offline)")
        #expect(offline["mode"] as? String == "offline", "\(offline)")
        // Since the checkpoint: the write during the full backup, the live one and the offline one.
        #expect(offline["bytes-copied"] as? Int == (64 + 128 + 64) << 10, "\(offline)")
        #expect(try s.layers().last?["checkpoint"] as? String == first, "the offline layer records the same checkpoint")
        #expect(try libvirt.checkpoints(s.domain) == [first], "no checkpoint is made for a shut-off domain")
        // Backing up a shut-off domain from its file is routine: no warning (JSON or stderr).
        #expect((offline["warnings"] as? [String] ?? []).isEmpty, "\(offline)")
        #expect(!s.stderr.contains("qbackup: warning:"), "\(s.stderr)")

        try s.start()
        try s.write(0x25, at: 7 << 20, length: 64 << 10)
        let live = try s.backup(during: { try s.write(0x26, at: 0, length: 64 << 10) })
        #expect(live["kind"] as? String == "incremental", "\(live)")
        #expect(live["mode"] as? String == "libvirt", "\(live)")
        let second = try #require(try s.layers().last?["checkpoint"] as? String)
        #expect(second != first)
        #expect(try libvirt.checkpoints(s.domain) == [second])
        try s.write(0x27, at: 3 << 20, length: 64 << 10)
        let last = try s.backup()
        #expect(last["kind"] as? String == "incremental")
        #expect(try s.layers().map { $0["mode"] as? String } == ["libvirt", "offline", "libvirt", "libvirt"])
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }

    /// Routine things a run does besides its layer are `qbackup: note:` lines (none with --quiet
    /// or --output json), not warnings: deleting a checkpoint of the repository that it does not
    /// need, and reading a shut-off domain from its disk file.
    func routineMessagesAreNotesNotWarnings(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-notes")
        try s.write(0x61, at: 0, length: 1 << 20)
        try s.start()
        try s.backup()
        let first = try #require(try s.layers().last?["checkpoint"] as? String)
        // A checkpoint of this repository that it does not need (as a failed run leaves one).
        let prefix = String(first[..<(try #require(first.lastIndex(of: "-")))])
        let stray = "\(prefix)-stray"
        try libvirt.must(["checkpoint-create-as", s.domain, "--name", stray, "--diskspec", "vda,checkpoint=bitmap"])
        #expect(try libvirt.checkpoints(s.domain) == [first, stray])
        try s.write(0x62, at: 2 << 20, length: 64 << 10)

        func human(_ extra: [String] = []) throws -> Tools.Result {
            let result = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", s.repo] + extra)
            #expect(result.status == 0, "\(result.stderr)")
            #expect(!result.stderr.contains("qbackup: warning:"), "\(result.stderr)")
            if let index = try s.layers().last?["index"] as? Int { s.points["vda", default: [:]][index] = s.model["vda"] }
            return result
        }
        let live = try human()
        #expect(live.stderr.contains("qbackup: note: deleted checkpoint '\(stray)' that the repository does not need"),
                "\(live.stderr)")
        #expect(try libvirt.checkpoints(s.domain).count == 1)

        try s.destroy()
        try s.write(0x63, at: 4 << 20, length: 64 << 10)
        let offline = try human()
        #expect(offline.stderr.contains("qbackup: note: domain '\(s.domain)' is shut off: backed up from its disk file"),
                "\(offline.stderr)")
        try s.write(0x64, at: 5 << 20, length: 64 << 10)
        let quiet = try human(["--quiet"])
        #expect(quiet.stderr.isEmpty, "--quiet prints no notes: \(quiet.stderr)")
        #expect(try s.layers().map { $0["mode"] as? String } == ["libvirt", "libvirt", "offline", "offline"])
        try s.checkEveryPoint()
        try s.checkNothingLeft()
    }

    /// An offline repository (`qbackup backup FILE`) of the domain's disk file continues as a
    /// libvirt one: the first libvirt layer is full (no checkpoint yet), says why and names the
    /// offline bitmap left in the file; then incrementals; the manifest records the domain from
    /// then on. Every point, offline ones included, restores. Another file's repository is refused.
    func anOfflineRepositoryOfTheDiskContinuesAsALibvirtOne(_ libvirt: LibvirtDaemon) throws {
        let s = try LibvirtScenario(libvirt, "lv-adopt")
        func offline() throws {
            let run = try QBackupBinary.run(["backup", s.disk("vda"), "--repo", s.repo, "--output", "json"])
            #expect(run.status == 0, "\(run.stderr)")
            let json = try JSONHelpers.parse(run.stdout) as? [String: Any] ?? [:]
            if let index = json["index"] as? Int { s.points["vda", default: [:]][index] = s.model["vda"] }
        }
        try s.write(0x81, at: 0, length: 1 << 20)
        try offline()
        try s.write(0x82, at: 2 << 20, length: 128 << 10)
        try offline()
        #expect(try s.layers().map { $0["kind"] as? String } == ["full", "incremental"])

        try s.start()
        let first = try s.backup(during: { try s.write(0x83, at: 4 << 20, length: 64 << 10) })
        #expect(first["kind"] as? String == "full", "\(first) \(s.stderr)")
        #expect(first["mode"] as? String == "libvirt", "\(first)")
        #expect((first["reason"] as? String)?.contains("offline ones of the disk file") == true, "\(first)")
        let warnings = (first["warnings"] as? [String] ?? []).joined(separator: "\n")
        #expect(warnings.contains("stays in that file") && warnings.contains("qbackup bitmap remove"), "\(first)")
        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental", "\(next) \(s.stderr)")
        #expect(next["bytes-copied"] as? Int == 64 << 10, "\(next)")
        #expect(try s.layers().map { $0["mode"] as? String } == ["offline", "offline", "libvirt", "libvirt"])
        let listed = try JSONHelpers.parse(try QBackupBinary.run(["list", s.repo, "--output", "json"]).stdout)
            as? [String: Any] ?? [:]
        #expect((listed["source"] as? [String: Any])?["kind"] as? String == "libvirt", "\(listed)")
        #expect(listed["bitmap"] is NSNull, "\(listed)")
        try s.checkEveryPoint()
        try s.checkNothingLeft()

        // A repository of another file stays another disk's.
        let other = s.dir.file("other.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", other, "\(s.size)")
        let otherRepo = s.dir.file("other-repo")
        #expect(try QBackupBinary.run(["backup", other, "--repo", otherRepo]).status == 0)
        let refused = try QBackupBinary.run(["backup", "--libvirt", s.domain, "--connect", libvirt.uri, "--repo", otherRepo])
        #expect(refused.status == 1, "\(refused.stderr)")
        #expect(refused.stderr.contains("belongs to another disk"), "\(refused.stderr)")
        try s.checkNothingLeft()
    }
}
