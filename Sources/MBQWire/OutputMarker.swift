/// The file by which workers recognise the coordinator's output directory.
public enum OutputMarker {
    public static let name = ".mbq-output"
}
