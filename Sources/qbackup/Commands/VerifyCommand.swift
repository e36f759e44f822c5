import ArgumentParser
import BackupChain

/// `qbackup verify DIR [--image IMAGE]`
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Verify a repository: every layer checks clean and matches the manifest and its checksum.",
        discussion: """
            With --image, also prove the tracking bitmap missed no write: every block where IMAGE \
            now differs from the latest backup must be dirty in the bitmap. Exit 0 when all is \
            well, 1 when a problem was found (each is listed).
            """)

    @Argument(help: "The repository folder.", completion: .directory) var repository: String

    @Option(name: .long, help: "The source image whose tracking bitmap to verify against the chain.", completion: .file())
    var image: String?

    @Option(name: .long, help: ArgumentHelp("How long to wait for a backup or merge that holds the repository to finish (seconds).",
                                            valueName: "seconds"))
    var wait: Double = 5

    @OptionGroup var options: GlobalOptions
    @OptionGroup var share: ShareOptions
    @OptionGroup var progressOptions: ProgressOptions

    func validate() throws {
        if !(wait >= 0 && wait <= 86400) { throw ValidationError("--wait must be 0 to 86400 seconds") }
    }

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let progress = progressOptions.reporter("verify")
            if let image { share.warn([image]) }
            let report = try ChainVerifier.verify(repository: repository, image: image, lockImage: share.lock, wait: wait,
                                                  logger: options.logger,
                                                  progress: progress?.update)
            progress?.finish()
            for line in report.warnings { warning(line) }
            if options.json {
                var pairs: [(String, JSON)] = [
                    ("ok", .bool(report.ok)), ("layers-checked", .int(Int64(report.layersChecked))),
                    ("problems", .array(report.problems.map(Self.json))),
                ]
                if report.imageChecked {
                    pairs.append(("missed-blocks", .uint(report.missedCount)))
                    pairs.append(("missed-offsets", .array(report.missedOffsets.map { .uint($0) })))
                }
                JSONReport.set(JSON.object(pairs))
            } else {
                for p in report.problems { emit("problem: \(p)\n") }
                if report.missedCount > 0 {
                    let list = report.missedOffsets.map { "0x" + String($0, radix: 16) }.joined(separator: ", ")
                    emit("bitmap missed \(report.missedCount) changed block(s), first at offsets: \(list)\n")
                }
                if report.ok {
                    options.inform("verified \(report.layersChecked) layer(s)\(report.imageChecked ? " and the tracking bitmap" : ""): all good\n")
                }
            }
            return report.ok ? 0 : 1
        }
    }

    /// {"kind": "checksum", "layer": 3, "file": "incr-….qcow2", "offset": 4194304, "message": "…"}
    static func json(_ problem: ChainVerifier.Problem) -> JSON {
        .object([("kind", .string(problem.kind.rawValue)), ("layer", problem.layer.map { .int(Int64($0)) } ?? .null),
                 ("file", problem.file.map(JSON.string) ?? .null), ("offset", problem.offset.map(JSON.uint) ?? .null),
                 ("message", .string(problem.message))])
    }
}
