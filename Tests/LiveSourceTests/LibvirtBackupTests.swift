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
}
