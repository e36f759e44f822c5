import Foundation
import Testing
import TestSupport

/// Issue 17 item 11: `merge --keep-daily/--keep-weekly/--keep-monthly` (with `--keep`, the
/// union) keeps the points restic's `forget` would keep, folds the others (in the middle of
/// the chain too) into the next kept point, and every kept point restores byte-exact under
/// its own index. The layers' `created` times are set by the test (manifest and sidecars).
@Suite struct RetentionTests {
    static func iso(_ date: Date) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        return f.string(from: date)
    }

    /// The points a policy keeps, worked out apart from qbackup's code from restic's rules as
    /// documented: for each rule, the newest point of each of its first `count` buckets (newest
    /// first), and the oldest point as well when fewer buckets than `count` hold points.
    static func expectedKept(_ points: [(index: Int, time: Date)], rules: [(count: Int, bucket: (Int, Date) -> String)])
        -> Set<Int>
    {
        let newestFirst = points.sorted { $0.time > $1.time }
        var kept = Set<Int>()
        for rule in rules {
            var buckets: [String] = []
            for point in newestFirst {
                let bucket = rule.bucket(point.index, point.time)
                if !buckets.contains(bucket) {
                    buckets.append(bucket)
                    if buckets.count <= rule.count { kept.insert(point.index) }
                }
            }
            if buckets.count < rule.count, let oldest = newestFirst.last { kept.insert(oldest.index) }
        }
        return kept
    }

    static func calendarRules(daily: Int, weekly: Int, monthly: Int, last: Int, zone: TimeZone)
        -> [(count: Int, bucket: (Int, Date) -> String)]
    {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = zone
        calendar.firstWeekday = 2
        calendar.minimumDaysInFirstWeek = 4
        return [
            (last, { index, _ in "\(index)" }),
            (daily, { _, d in let c = calendar.dateComponents([.year, .month, .day], from: d); return "\(c.year!)-\(c.month!)-\(c.day!)" }),
            (weekly, { _, d in let c = calendar.dateComponents([.yearForWeekOfYear, .weekOfYear], from: d); return "\(c.yearForWeekOfYear!)-W\(c.weekOfYear!)" }),
            (monthly, { _, d in let c = calendar.dateComponents([.year, .month], from: d); return "\(c.year!)-\(c.month!)" }),
        ]
    }

    static func indices(_ array: Any?) -> [Int] {
        (array as? [[String: Any]] ?? []).compactMap { $0["index"] as? Int }
    }

    /// 90 nights from 2025-10-01 (a day skipped every 9 nights, a second backup on some days, a
    /// full layer at night 40, the disk grown at night 60, across a month and ISO-year change):
    /// the dry-run lists exactly what restic's rules keep (UTC, and in a local zone with
    /// --local-time), the merge then does exactly that, every kept point restores byte-exact
    /// under its index, and verify passes.
    @Test func ninetyNights() throws {
        let s = try BackupScenario(size: "4M", seed: 171)
        var times: [Int: String] = [:]
        var points: [(index: Int, time: Date)] = []
        let start = try #require(ISO8601DateFormatter().date(from: "2025-10-01T01:30:00Z"))
        var day = 0
        for night in 0..<90 {
            if night > 0 { day += night % 13 == 5 ? 0 : (night % 9 == 0 ? 2 : 1) }
            let time = start.addingTimeInterval(Double(day) * 86400 + (night % 13 == 5 ? 7200 : 0))
            if night == 60 { try Tools.qemuImg("resize", "-f", "qcow2", s.disk, "5M") }
            try s.dirty(writes: 2, maxOffset: 3 << 20)
            try s.backup(night == 40 ? ["--full"] : [])
            times[night] = Self.iso(time)
            points.append((night, time))
        }
        #expect(try s.layers().map { $0["index"] as? Int } == Array(0..<90))
        try RepositoryTimes.setCreated(s.repo, times)
        let policy = ["--keep", "3", "--keep-daily", "10", "--keep-weekly", "5", "--keep-monthly", "3"]

        // --local-time in a zone where 01:30 UTC is the evening before: other days are counted.
        let zone = try #require(TimeZone(identifier: "America/New_York"))
        let local = try QBackupBinary.run(["merge", s.repo, "--dry-run", "--local-time", "--output", "json"] + policy,
                                          environment: ["TZ": "America/New_York"])
        #expect(local.status == 0, "\(local.stderr)")
        let localJSON = try JSONHelpers.parse(local.stdout) as? [String: Any]
        let localExpected = Self.expectedKept(points, rules: Self.calendarRules(daily: 10, weekly: 5, monthly: 3, last: 3, zone: zone))
        #expect(Set(Self.indices(localJSON?["kept"])) == localExpected)

        let utc = try #require(TimeZone(identifier: "UTC"))
        let expected = Self.expectedKept(points, rules: Self.calendarRules(daily: 10, weekly: 5, monthly: 3, last: 3, zone: utc))
        #expect(localExpected != expected, "the local zone should count other days than UTC in this scenario")
        let dry = try s.qbackup(["merge", s.repo, "--dry-run", "--output", "json"] + policy)
        let dryJSON = try JSONHelpers.parse(dry.stdout) as? [String: Any]
        let kept = Self.indices(dryJSON?["kept"])
        let dropped = Self.indices(dryJSON?["dropped"])
        print("retention over 90 nights: keeps \(kept), local time keeps \(Self.indices(localJSON?["kept"]))")
        #expect(Set(kept) == expected, "kept \(kept), expected \(expected.sorted())")
        #expect(Set(kept + dropped) == Set(0..<90) && kept.count + dropped.count == 90)
        #expect(try s.layers().count == 90, "--dry-run changed the repository")
        let human = try s.qbackup(["merge", s.repo, "--dry-run"] + policy).stdout
        let lines = human.split(separator: "\n")
        #expect(lines.filter { $0.hasPrefix("keep ") }.map { Int($0.split(separator: " ")[1]) } == kept)
        #expect(lines.filter { $0.hasPrefix("drop ") }.map { Int($0.split(separator: " ")[1]) } == dropped)

        let merged = try s.qbackup(["merge", s.repo, "--output", "json"] + policy)
        let mergedJSON = try JSONHelpers.parse(merged.stdout) as? [String: Any]
        #expect(mergedJSON?["folded"] as? Int == dropped.count)
        #expect(try s.layers().map { $0["index"] as? Int ?? -1 } == kept, "the points left are not the ones listed")
        try s.qbackup(["verify", s.repo])
        for index in kept { try s.expectRestore(index, equals: s.references[index]) }
        for layer in try s.layers() { try s.expectQemuCheckClean(s.layerPath(layer)) }
        // A second run keeps what it kept: the same policy on the same points changes nothing.
        let again = try s.qbackup(["merge", s.repo, "--output", "json"] + policy)
        #expect((try JSONHelpers.parse(again.stdout) as? [String: Any])?["folded"] as? Int == 0)
    }

    /// Five points on three days; `--keep-daily 3` keeps 0, 3, 4 and folds 1 and 2 into 3 in the
    /// middle of the chain. Every write/fsync of that fold, one crash each (QBACKUP_CRASH_AFTER),
    /// in place and (`shared`: the files hard-linked by a `cp -al` copy) writing a new file: after
    /// the next merge the kept points restore byte-exact, verify passes, the copy never changes.
    @Test(arguments: [false, true])
    func crashAtEveryStepOfAMiddleFold(shared: Bool) throws {
        let template = try BackupScenario.points(5, size: "8M", seed: shared ? 173 : 172, fullWrites: 6, writes: 6,
                                                 maxOffset: 7 << 20)
        try RepositoryTimes.setCreated(template.repo, [0: "2026-03-01T01:00:00Z", 1: "2026-03-02T01:00:00Z", 2: "2026-03-02T05:00:00Z",
                                            3: "2026-03-02T09:00:00Z", 4: "2026-03-03T01:00:00Z"])
        let work = TempDir("qbackup-retention-crash")
        var pending = 0
        let outcome = try CrashPoints.enumerate(limit: 2000, denseSteps: 40, stride: 4) { n, crashAfter in
            let repo = work.file("repo-\(n)")
            let snap = work.file("snap-\(n)")
            try Tools.run("cp", ["-a", "--sparse=always", template.repo, repo])
            if shared { try Tools.run("cp", ["-al", repo, snap]) }
            let before = shared ? try BackupScenario.digests(snap) : [:]
            let result = try QBackupBinary.run(["merge", repo, "--keep-daily", "3"], environment: crashAfter)
            try #require(result.status != 2, "merge --keep-daily is not understood: \(result.stderr)")
            if result.status != 0 { #expect(result.stderr.isEmpty, "step \(n): \(result.stderr)") }
            let manifest = try String(contentsOfFile: repo + "/manifest.json", encoding: .utf8)
            if manifest.contains("\"merge\" :") { pending += 1 }
            try template.qbackup(["merge", repo, "--keep-daily", "3"])
            try template.expectKeeps([0, 3, 4], in: repo, step: "step \(n)")
            if shared {
                #expect(try BackupScenario.digests(snap) == before, "step \(n): a file of the hard-linked copy changed")
                try FileManager.default.removeItem(atPath: snap)
            }
            try FileManager.default.removeItem(atPath: repo)
            return result
        }
        #expect(outcome.completed, "the merge never completed within the steps tried")
        #expect(outcome.crashes > 10, "only \(outcome.crashes) crash points were exercised")
        #expect(pending > 0, "no crash fell between recording the fold and finishing it")
    }

    /// Usage: no rule is a usage error (exit 2), a count below 1 too.
    @Test func aRuleIsRequired() throws {
        let s = try BackupScenario(size: "1M", seed: 174)
        try s.backup()
        for args in [["merge", s.repo], ["merge", s.repo, "--keep-daily", "0"], ["merge", s.repo, "--keep-weekly", "-1"]] {
            let result = try QBackupBinary.run(args)
            #expect(result.status == 2, "\(args): \(result.stderr)")
        }
    }
}
