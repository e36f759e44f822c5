import ArgumentParser
import FoundationEssentials
import Glibc
import BackupChain
import QCowImage

/// `qbackup restore DIR --to OUT [--at POINT] [--format qcow2|raw]`
struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Write the disk as it was at one backup layer as a standalone image.",
        discussion: """
            The repository is never modified. OUT is written under a temporary name beside it and \
            renamed into place only when complete; an existing OUT is refused unless --force. OUT \
            '-' writes the raw disk to stdout (messages and progress go to stderr); a block device \
            is written in place, raw, every byte (with --force: its contents are replaced).
            """)

    @Argument(help: "The repository folder.", completion: .directory) var repository: String

    @Option(name: .long, help: "The output image file (must not exist, unless --force), '-' for stdout, or a block device.",
            completion: .file())
    var to: String

    @Flag(name: .long, help: "Replace an existing OUT (a regular file) once the new one is complete.") var force = false

    @Option(name: .long,
            help: ArgumentHelp("The point to restore: its index or layer file (see 'qbackup list'), 'latest' (the default), or an ISO 8601 time such as 2026-12-01T02:00:00Z (the latest point at or before it; a date alone means that day's end, UTC).",
                               valueName: "point"),
            transform: { try PointSelector(parsing: $0) })
    var at: PointSelector = .latest

    @Option(name: .long, help: "Format of the restored image: qcow2 (default) or raw, which '-' and block devices take.")
    var format: RestoreEngine.OutputFormat?

    @Flag(name: .long, help: "Check each layer's checksum before reading it (reads the chain twice).")
    var verify = false

    @OptionGroup var options: GlobalOptions
    @OptionGroup var progressOptions: ProgressOptions

    /// `-` and block devices take raw; everything else qcow2 unless --format says.
    var isInPlace: Bool {
        var st = stat()
        return to == "-" || (stat(to, &st) == 0 && st.st_mode & S_IFMT == S_IFBLK)
    }

    func validate() throws {
        if to == "-" && options.json { throw ValidationError("--to - writes the disk to stdout: it takes no --output json") }
        if to == "-" && isatty(STDOUT_FILENO) != 0 { throw ValidationError("--to -: stdout is a terminal; pipe or redirect it") }
        if to == "-" && format == .qcow2 { throw ValidationError("--to - writes the raw disk: it takes no --format qcow2") }
        // qbackup lays a qcow2 image out by growing its file, which a device of fixed size cannot
        // do; QEMU writes qcow2 onto a device (an LV, say), reading a layer through its chain.
        if isInPlace && format == .qcow2 {
            throw ValidationError("a block device takes a raw restore (--format raw): qbackup writes qcow2 only to a file; for a qcow2 image on the device run 'qemu-img convert -O qcow2 \(repository)/LAYER \(to)' with the point's layer file (see 'qbackup list \(repository)'), which reads through its backing chain")
        }
    }

    func run() throws {
        let format = format ?? (isInPlace ? .raw : .qcow2)
        try ExitStatus.run(json: options.json) {
            let progress = progressOptions.reporter("restore")
            let result = try RestoreEngine.restore(
                RestoreEngine.Request(repository: repository, output: to, point: at, format: format, verify: verify,
                                      force: force),
                progress: progress?.update)
            progress?.finish()
            if options.json {
                JSONReport.set(JSON.object([("index", .int(Int64(result.index))), ("layer", .string(result.layer.file)),
                                  ("output", .string(to)), ("format", .string(format.rawValue)),
                                  ("virtual-size", .uint(result.virtualSize)), ("data-bytes", .uint(result.dataBytes))]))
            } else {
                let summary = "restored layer \(result.index) (\(result.layer.created)) to \(to == "-" ? "stdout" : to)\n"
                if to == "-" {
                    if !options.quiet { standardError(summary) }
                } else {
                    options.inform(summary)
                }
            }
            return 0
        }
    }
}

extension RestoreEngine.OutputFormat: ExpressibleByArgument {}
