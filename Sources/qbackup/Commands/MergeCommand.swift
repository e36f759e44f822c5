import ArgumentParser
import BackupChain

/// `qbackup merge DIR --keep N` — retention.
struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Fold the oldest layers of a repository together so at most N remain.",
        discussion: """
            Every remaining point in time restores to the same bytes as before. The new oldest \
            layer is written as a standalone file first and swapped in through the manifest, so \
            a crash at any moment leaves the repository usable (the next run finishes the merge).
            """)

    @Argument(help: "The repository folder.") var repository: String

    @Option(name: .long, help: "How many layers to keep (at least 1).") var keep: Int

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    func validate() throws {
        if keep < 1 { throw ValidationError("--keep must be at least 1") }
    }

    func run() throws {
        try ExitStatus.run {
            let progress = progressOptions.reporter("merge")
            let result = try MergeEngine.merge(repository: repository, keep: keep, logger: options.logger,
                                               progress: progress?.update)
            progress?.finish()
            if options.json {
                emit(JSON.object([("folded", .int(Int64(result.folded))), ("remaining", .int(Int64(result.remaining))),
                                  ("bytes-written", .uint(result.bytesWritten))]).pretty() + "\n")
            } else if result.folded == 0 {
                options.inform("nothing to merge: \(result.remaining) layer(s), keeping \(keep)\n")
            } else {
                options.inform("folded \(result.folded) layer(s); \(result.remaining) remain\n")
            }
            return 0
        }
    }
}
