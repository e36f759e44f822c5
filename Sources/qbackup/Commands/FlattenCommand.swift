import ArgumentParser
import QCowImage

/// `qbackup flatten TOP OUT` — the guest-visible contents of a chain as one standalone image.
struct FlattenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flatten",
        abstract: "Write the guest-visible contents of a whole chain as one standalone image.",
        discussion: "Unallocated and zero ranges stay holes (raw) or unallocated/zero (qcow2) in the output.")

    @Argument(help: "The top image of the chain.", completion: .file()) var top: String
    @Argument(help: "The output file (must not exist, unless --force).", completion: .file()) var out: String

    @Flag(name: .long, help: "Replace an existing OUT (a regular file) once the new one is complete.") var force = false

    @Option(name: .long, help: "Format of OUT: qcow2 (default) or raw.")
    var format: ImageOpener.Format = .qcow2

    @Option(name: .long, help: "Compress the qcow2 output's clusters: zlib or zstd.")
    var compress: CompressionType?

    @Option(name: .long, parsing: .unconditional, help: "Cluster size of a qcow2 output (default 64K).",
            transform: parseClusterSize)
    var clusterSize: Int?

    func validate() throws {
        if compress != nil && format == .raw { throw ValidationError("--compress needs --format qcow2") }
    }

    @OptionGroup var options: GlobalOptions
    @OptionGroup var share: ShareOptions
    @OptionGroup var progressOptions: ProgressOptions

    func run() throws {
        try ExitStatus.run(json: options.json) {
            let source = try ImageOpener.open(top, lock: share.lock)
            share.warn([top])
            defer { source.close() }
            let progress = progressOptions.reporter("flatten")
            var flatten = FlattenOptions()
            flatten.format = format
            flatten.compression = compress
            if let clusterSize { flatten.clusterSize = clusterSize }
            let result = try ImageFlattener.flatten(source, to: out, options: flatten, overwrite: force, logger: options.logger,
                                                    progress: progress?.update)
            let written = result.dataBytes
            progress?.finish()
            if options.json {
                JSONReport.set(JSON.object([("file", .string(out)), ("format", .string(format.rawValue)),
                                  ("virtual-size", .uint(source.virtualSize)), ("data-bytes", .uint(written))]))
            }
            DamageWarnings.emit(for: [source])
            return 0
        }
    }
}
