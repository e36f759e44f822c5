import ArgumentParser
import QCowImage

/// `qbackup create IMAGE SIZE [...]` — a new qcow2 v3 (or raw) image.
struct CreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a new qcow2 v3 image (or a raw one), like qemu-img create.",
        discussion: "SIZE takes K/M/G/T suffixes. With --backing, SIZE defaults to the backing file's size.")

    @Argument(help: "The new image file (must not exist, unless --force).", completion: .file()) var image: String
    @Argument(help: "Virtual size, e.g. 10G.", transform: parseSize) var size: UInt64?

    @Option(name: [.customShort("f"), .customLong("format")], help: "qcow2 (default) or raw.")
    var format: ImageOpener.Format = .qcow2
    @Option(name: .long, parsing: .unconditional, help: "Cluster size, 512 to 2M (default 64K).",
            transform: parseClusterSize)
    var clusterSize: Int?
    @Option(name: .long, help: "Backing file (stored as given; relative names are taken from the image's folder).")
    var backing: String?
    @Option(name: .long, help: "Format of the backing file: qcow2 or raw (default: probe it).")
    var backingFormat: ImageOpener.Format?
    @Option(name: .long, help: "Compression type for compressed clusters: zlib (default) or zstd.")
    var compressionType: CompressionType = .zlib
    @Flag(name: .long, help: "Use extended L2 entries (subclusters).") var extendedL2 = false
    @Flag(name: .long, help: "Replace an existing IMAGE (a regular file) once the new one is complete.") var force = false
    @Option(name: .long, help: "Refcount width: 1, 2, 4, 8, 16 (default), 32 or 64 bits.") var refcountBits: Int = 16

    @OptionGroup var options: GlobalOptions


    func validate() throws {
        if size == nil && backing == nil {
            // The parser takes "-1" for an option, so a negative SIZE arrives here as no SIZE.
            if let negative = CommandLine.arguments.dropFirst().first(where: isNegativeNumber) {
                throw ValidationError("'\(negative)' is not a size: sizes are not negative")
            }
            throw ValidationError("SIZE is required without --backing")
        }
        if format == .raw && (backing != nil || extendedL2) {
            throw ValidationError("raw images take no backing file or qcow2 options")
        }
    }

    func run() throws {
        try ExitStatus.run(json: options.json) {
            var bytes: UInt64
            if let size {
                bytes = size
            } else {
                let base = try ImageOpener.open(ImageOpener.combine(base: image, relative: backing ?? ""),
                                                format: backingFormat)
                bytes = base.virtualSize
                base.close()
            }
            if format == .raw {
                try QCowCreator.createRaw(at: image, size: bytes, overwrite: force)
            } else {
                var create = QCowCreateOptions(size: bytes)
                if let clusterSize { create.clusterSize = clusterSize }
                create.refcountBits = refcountBits
                create.extendedL2 = extendedL2
                create.compression = compressionType
                if let backing {
                    create.backingFile = backing
                    var backingType = backingFormat
                    if backingType == nil {
                        let base = try ImageOpener.open(ImageOpener.combine(base: image, relative: backing))
                        backingType = ImageOpener.Format(rawValue: base.formatName)
                        base.close()
                    }
                    create.backingFormat = backingType
                }
                try QCowCreator.createFile(at: image, options: create, overwrite: force)
            }
            if options.json {
                JSONReport.set(JSON.object([("file", .string(image)), ("format", .string(format.rawValue)),
                                  ("virtual-size", .uint(bytes))]))
            } else {
                options.inform("Formatting '\(image)', fmt=\(format.rawValue) size=\(bytes)\n")
            }
            return 0
        }
    }
}
