import ArgumentParser
import BackupChain
import FoundationEssentials

/// `qbackup merge DIR [--keep N] [--keep-daily D] [--keep-weekly W] [--keep-monthly M]` — retention.
struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Fold the points of a repository that retention does not keep into the points that stay.",
        discussion: """
            The points kept are the union of the rules given: --keep N the newest N; --keep-daily, \
            --keep-weekly and --keep-monthly the newest point of each of the last D days, W ISO weeks \
            and M months that hold a point (counted as restic's forget counts them), in UTC unless \
            --local-time. Every remaining point restores to the same bytes as before and keeps its \
            index. Each fold is recorded in the manifest before a file changes, so a crash at any \
            moment leaves the repository usable (the next run finishes the merge). --dry-run lists \
            which points go and which stay, and changes nothing.
            """)

    @Argument(help: ArgumentHelp("The repository folder.", valueName: "dir"), completion: .directory)
    var repository: String

    @Option(name: .long, help: "Keep the newest N points.") var keep: Int?
    @Option(name: .customLong("keep-daily"), help: "Keep the newest point of each of the last D days with a point.")
    var keepDaily: Int?
    @Option(name: .customLong("keep-weekly"), help: "Keep the newest point of each of the last W ISO weeks with a point.")
    var keepWeekly: Int?
    @Option(name: .customLong("keep-monthly"), help: "Keep the newest point of each of the last M months with a point.")
    var keepMonthly: Int?
    @Flag(name: .customLong("local-time"), help: "Count days, weeks and months in local time, not UTC.")
    var localTime = false
    @Flag(name: .customLong("dry-run"), help: "List which points would go and which stay; change nothing.")
    var dryRun = false

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    var policy: RetentionPolicy {
        RetentionPolicy(last: keep, daily: keepDaily, weekly: keepWeekly, monthly: keepMonthly,
                        localTime: localTime)
    }

    func validate() throws {
        if policy.isEmpty { throw ValidationError("give at least one of --keep, --keep-daily, --keep-weekly, --keep-monthly") }
        for (name, value) in [("--keep", keep), ("--keep-daily", keepDaily), ("--keep-weekly", keepWeekly),
                              ("--keep-monthly", keepMonthly)] {
            if let value, value < 1 { throw ValidationError("\(name) must be at least 1") }
        }
    }

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let progress = dryRun ? nil : progressOptions.reporter("merge")
            let result = try MergeEngine.merge(repository: repository, policy: policy, dryRun: dryRun,
                                               logger: options.logger, progress: progress?.update)
            progress?.finish()
            if options.json {
                JSONReport.set(Self.json(result, dryRun: dryRun))
            } else if dryRun {
                emit(Self.listing(result))
            } else if result.folded == 0 {
                options.inform("nothing to merge: all \(result.remaining) point(s) are kept\n")
            } else {
                options.inform("folded \(result.folded) point(s); \(result.remaining) remain\n")
            }
            return 0
        }
    }

    /// One line per point, oldest first: `keep` or `drop`, index, created, the rules that keep it.
    static func listing(_ result: MergeEngine.Result) -> String {
        var out = ""
        for index in (result.kept + result.dropped).sorted() {
            let created = result.created[index] ?? ""
            if let reasons = result.reasons[index] {
                out += "keep \(index) \(created) \(reasons.joined(separator: ","))\n"
            } else {
                out += "drop \(index) \(created)\n"
            }
        }
        out += "would fold \(result.dropped.count) point(s); \(result.kept.count) remain\n"
        return out
    }

    static func json(_ result: MergeEngine.Result, dryRun: Bool) -> JSON {
        let kept = result.kept.map { index in
            JSON.object([("index", .int(Int64(index))), ("created", .string(result.created[index] ?? "")),
                         ("reasons", .array((result.reasons[index] ?? []).map(JSON.string)))])
        }
        let dropped = result.dropped.map { index in
            JSON.object([("index", .int(Int64(index))), ("created", .string(result.created[index] ?? ""))])
        }
        return JSON.object([("dry-run", .bool(dryRun)), ("folded", .int(Int64(dryRun ? 0 : result.folded))),
                            ("remaining", .int(Int64(dryRun ? result.kept.count + result.dropped.count : result.remaining))),
                            ("bytes-written", .uint(result.bytesWritten)), ("kept", .array(kept)),
                            ("dropped", .array(dropped))])
    }
}
