import Foundation
import Testing
import TestSupport

/// Issue 17 item 10: `restore --at` names a point by its index (kept for life, also after a
/// merge), its layer's file name, `latest`, or an ISO 8601 time (the latest point at or before
/// it, with `Z` or an offset); anything else is an error that names the points held.
@Suite struct PointSelectorTests {
    /// Five nights, 2026-11-01..05 at 02:00Z, then `merge --keep 3`: points 2 (the folded base), 3, 4.
    @Test func restoreAtNamesAPointEveryWay() throws {
        let s = try BackupScenario(size: "16M", seed: 171)
        for _ in 0..<5 {
            try s.dirty(writes: 3, maxOffset: 14 << 20)
            try s.backup()
        }
        try RepositoryTimes.setCreated(s.repo, Dictionary(uniqueKeysWithValues: (0..<5).map { ($0, "2026-11-0\($0 + 1)T02:00:00Z") }))
        try s.qbackup(["merge", s.repo, "--keep", "3"])
        try s.qbackup(["verify", s.repo])
        let files = Dictionary(uniqueKeysWithValues: try s.layers().compactMap { l in
            (l["index"] as? Int).map { ($0, l["file"] as? String ?? "") }
        })
        #expect(files.keys.sorted() == [2, 3, 4], "\(files)")

        /// The point `restore --at at` restored, checked byte for byte against its night's reference.
        func restored(_ at: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> Int? {
            let out = s.dir.file("at-\(UUID().uuidString.prefix(6)).raw")
            defer { try? FileManager.default.removeItem(atPath: out) }
            let result = try s.qbackup(["restore", s.repo, "--to", out, "--format", "raw", "--output", "json"] + at,
                                       sourceLocation: sourceLocation)
            let json = try JSONHelpers.parse(result.stdout) as? [String: Any]
            guard let index = json?["index"] as? Int else { return nil }
            #expect(try s.same(out, s.references[index]), "--at \(at) restored other bytes than point \(index)",
                    sourceLocation: sourceLocation)
            return index
        }
        let cases: [([String], Int)] = [
            (["--at", "3"], 3),
            (["--at", "2"], 2),
            (["--at", try #require(files[3])], 3),
            (["--at", "\(s.repo)/\(try #require(files[2]))"], 2),
            (["--at", "latest"], 4),
            ([], 4),
            (["--at", "2026-11-04T02:00:00Z"], 3),            // exactly point 3's time
            (["--at", "2026-11-04T01:59:59Z"], 2),            // a second before it
            (["--at", "2026-11-04T12:00:00+05:00"], 3),       // 07:00Z
            (["--at", "2026-11-05T02:30:00+01:00"], 3),       // 01:30Z, before point 4
            (["--at", "2026-11-04T20:00:00-08:00"], 4),       // 04:00Z the next day
            (["--at", "2026-11-04T02:00:00.5Z"], 3),
            (["--at", "2026-11-04"], 3),                      // that day, as it ended (UTC)
            (["--at", "2030-01-01T00:00Z"], 4),
        ]
        for (at, expected) in cases {
            #expect(try restored(at) == expected, "--at \(at)")
        }

        // A point that is not held: one error line naming the points that are.
        for at in ["0", "1", "99", "2026-11-02T12:00:00Z", "2026-11-03T01:00:00+00:00", "nosuch.qcow2", "/etc/passwd"] {
            let result = try QBackupBinary.run(["restore", s.repo, "--to", s.dir.file("no.raw"), "--at", at])
            #expect(result.status == 1 && result.failedCleanly, "--at \(at): \(result.status) \(result.stderr)")
            let line = String(result.errorLines.first ?? "")
            for held in ["2 (2026-11-03T02:00:00Z)", "3 (2026-11-04T02:00:00Z)", "4 (2026-11-05T02:00:00Z)"] {
                #expect(line.contains(held), "--at \(at): \(line)")
            }
            #expect(!FileManager.default.fileExists(atPath: s.dir.file("no.raw")))
        }
        // Something that starts like a date but is none: a usage error that says so.
        for at in ["2026-02-30", "2026-11-04T25:00:00Z", "2026-11-04T02:00:00+24:00", "2026-11-0"] {
            let result = try QBackupBinary.run(["restore", s.repo, "--to", s.dir.file("no.raw"), "--at", at])
            #expect(result.status == 2 && result.stderr.contains("ISO 8601"), "--at \(at): \(result.status) \(result.stderr)")
        }
    }
}
