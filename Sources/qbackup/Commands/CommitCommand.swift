import ArgumentParser
import BitmapStore
import QCowImage

/// `qbackup commit TOP` — merge TOP into its backing file, like qemu-img commit.
struct CommitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "commit",
        abstract: "Write TOP's changes into its backing file (like qemu-img commit).",
        discussion: """
            Enabled bitmaps in the backing file get every committed range marked dirty, so \
            incremental backups of the backing file see the change. TOP is left as it is.
            """)

    @Argument(help: "The top image (qcow2) whose backing file receives its data.", completion: .file()) var top: String

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let progress = progressOptions.reporter("commit")
            let result = try CommitTracking.commit(topPath: top, logger: options.logger, progress: progress?.update)
            progress?.finish()
            if options.json {
                JSONReport.set(JSON.object([("top", .string(top)), ("data-bytes", .uint(result.dataBytes)),
                                  ("zero-bytes", .uint(result.zeroBytes))]))
            } else {
                options.inform("Image committed.\n")
            }
            return 0
        }
    }
}
