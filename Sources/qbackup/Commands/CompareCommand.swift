import ArgumentParser
import QCowImage

/// `qbackup compare A B` — guest-visible contents equal? qemu-img compare's exit statuses.
struct CompareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Check whether two images have the same guest-visible contents (like qemu-img compare).",
        discussion: """
            Either image may be qcow2 or raw, with any backing chain. Exit status: 0 identical, \
            1 different, 2 error. Without --strict, an image larger than the other matches when \
            its extra part reads as zeros.
            """)

    @Argument(help: "The first image.", completion: .file()) var first: String
    @Argument(help: "The second image.", completion: .file()) var second: String

    @Option(name: [.customShort("f")], help: "Format of the first image (qcow2 or raw; default: probe).")
    var firstFormat: ImageOpener.Format?
    @Option(name: [.customShort("F")], help: "Format of the second image (qcow2 or raw; default: probe).")
    var secondFormat: ImageOpener.Format?

    @Flag(name: [.short, .long], help: "Strict mode: images of different sizes differ.")
    var strict = false

    @OptionGroup var options: GlobalOptions
    @OptionGroup var share: ShareOptions
    @OptionGroup var progressOptions: ProgressOptions

    func run() throws {
        try ExitStatus.run(json: options.json, errorStatus: 2) {
            let a = try ImageOpener.open(first, format: firstFormat, lock: share.lock)
            defer { a.close() }
            let b = try ImageOpener.open(second, format: secondFormat, lock: share.lock)
            defer { b.close() }
            share.warn([first, second])
            let progress = progressOptions.reporter("compare")
            let outcome = try ImageComparison.compare(a, b, strict: strict, progress: progress?.update)
            progress?.finish()
            DamageWarnings.emit(for: [a, b])
            func report(_ pairs: [(String, JSON)], _ human: String) {
                if options.json { JSONReport.set(.object(pairs)) } else { emit(human) }
            }
            switch outcome {
            case .identical:
                report([("identical", .bool(true))], "Images are identical.\n")
                return 0
            case .mismatch(let offset):
                report([("identical", .bool(false)), ("offset", .uint(offset))], "Content mismatch at offset \(offset)!\n")
                return 1
            case .sizeMismatch(let x, let y):
                report([("identical", .bool(false)), ("sizes", .array([.uint(x), .uint(y)]))],
                       "Strict mode: Image size mismatch!\n")
                return 1
            }
        }
    }
}
