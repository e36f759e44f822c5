import ArgumentParser
import QCowImage

/// `qbackup flatten TOP OUT` — the guest-visible contents of a chain as one standalone image.
struct FlattenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flatten",
        abstract: "Write the guest-visible contents of a whole chain as one standalone image.",
        discussion: "Unallocated and zero ranges stay holes (raw) or unallocated/zero (qcow2) in the output.")

    @Argument(help: "The top image of the chain.") var top: String
    @Argument(help: "The output file (must not exist).") var out: String

    @Option(name: .long, help: "Output format: raw (qcow2 output comes with the write engine).")
    var format: ImageOpener.Format = .raw

    @OptionGroup var options: GlobalOptions

    func run() throws {
        try ExitStatus.run {
            let source = try ImageOpener.open(top)
            defer { source.close() }
            let progress = options.progressReporter("flatten")
            let written: UInt64
            switch format {
            case .raw:
                written = try RawExporter.export(source, to: out, progress: progress?.update)
            case .qcow2:
                throw QCowError(.unsupported, "qcow2 output is not available yet; use --format raw")
            }
            progress?.finish()
            if options.json {
                emit(JSON.object([("file", .string(out)), ("format", .string(format.rawValue)),
                                  ("virtual-size", .uint(source.virtualSize)), ("data-bytes", .uint(written))]).pretty() + "\n")
            }
            return 0
        }
    }
}
